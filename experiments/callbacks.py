"""Hydra callbacks: the sweep-level index written when a multirun ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ["run", "status", "model", "method", "method_options", "bits", "group_size", "avg_bits", "config_hash"]


class SweepIndex(Callback):
    """`<sweep dir>/index.csv`: one row per method entry of every run found under the sweep
    directory (runs resumed from earlier invocations included), with its status and metrics."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_index(Path(config.hydra.sweep.dir))


def write_index(sweep_dir: Path) -> Path | None:
    from experiments.cache import atomic_write_bytes
    from experiments.reporting import load_runs

    runs = load_runs([sweep_dir])
    if runs.empty:
        return None
    runs = runs.assign(run=[str(Path(p).relative_to(sweep_dir)) for p in runs["run_dir"]])
    metrics = [c for c in runs.columns if c.startswith(("ppl_", "baseline_ppl_")) and not c.endswith("_seqlen")]
    path = sweep_dir / INDEX_FILE
    atomic_write_bytes(path, runs[INDEX_COLUMNS + sorted(metrics)].to_csv(index=False).encode())
    return path
