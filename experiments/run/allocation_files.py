"""Per-group bit allocations on disk (SliM-LLM, reference/methods.md §6.2): the file I/O that
methods/ does not do.

Layout, the reference's `block_precision_{G}_{N}bit/<model>.pt` (and the authors' published
files): a `torch.save`d dict {block index (int): {linear name inside the block (str, e.g.
"self_attn.q_proj"): [bits of group 0, group 1, ...]}}.

- `method.allocation=PATH`: `attach(method)` reads the file and hands the table to the method
  (`use_allocation`) before it quantizes; it then quantizes with those widths and does not search.
- `method.save_allocation=PATH`: `save(method, layers)` writes the widths the run used, taken from
  the per-layer records (so a run whose quantization came from the cache still writes it).

The quantization cache's key holds the file's sha256 (experiments/store/artifacts.py), so replacing an
allocation file in place makes a new entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantlab.methods.base import ConfigError, Method


def read_allocation(path: str | Path) -> dict[int, dict[str, list[int]]]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"method.allocation={str(path)!r}: no such file (a block_precision .pt allocation)")
    table = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ConfigError(f"{path}: not an allocation ({{block index: {{linear name: [bits per group]}}}})")
    return {int(i): {str(n): [int(b) for b in bits] for n, bits in layer.items()} for i, layer in table.items()}


def write_allocation(path: str | Path, table: dict[int, dict[str, list[int]]]) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(table, path)


def attach(method: Method) -> None:
    """Load `method.allocation` into the method, if it has one."""
    path = getattr(method.config, "allocation", None)
    if path is not None:
        method.use_allocation(read_allocation(path))  # type: ignore[attr-defined]


def table_from_layers(layers: list[dict[str, Any]]) -> dict[int, dict[str, list[int]]]:
    """{block index: {linear: widths}} from per-layer records that carry an allocation."""
    table: dict[int, dict[str, list[int]]] = {}
    for layer in layers:
        info = layer.get("info", {})
        if "allocation" in info:
            table.setdefault(int(info["block_index"]), {})[str(info["linear"])] = list(info["allocation"])
    return table


def save(method: Method, layers: list[dict[str, Any]]) -> Path | None:
    """Write the run's allocation to `method.save_allocation`, if set; returns the path."""
    path = getattr(method.config, "save_allocation", None)
    if path is None:
        return None
    write_allocation(path, table_from_layers(layers))
    return Path(path).expanduser()
