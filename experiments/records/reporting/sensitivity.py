"""Sensitivity records (experiments/run/sensitivity.py) as tables: the damage map behind the
heatmap (plots.py `sensitivity_heatmap`), the proxies ranked by Spearman's rank correlation with
the measured damage, and the most sensitive units.

    quantlab-report outputs/runs/<sensitivity run> --sensitivity 3                       # tables
    quantlab-report outputs/runs/<sensitivity run> --sensitivity 3 --plot heatmap h.png  # the map
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from quantlab.experiments.evaluation.statistics import spearman
from quantlab.experiments.records.reporting.records import ReportError
from quantlab.experiments.records.sensitivity_record import DAMAGES, SENSITIVITY_FILE, damage_of


def load_sensitivity(paths: Iterable[Path | str]) -> list[tuple[Path, dict[str, Any]]]:
    """Every sensitivity record at or under `paths` (files or directories)."""
    found = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob(SENSITIVITY_FILE)) if path.is_dir() else []
        for file in files:
            if file.name == SENSITIVITY_FILE:
                found.append((file, json.loads(file.read_text())))
    if not found:
        raise ReportError(f"no {SENSITIVITY_FILE} under {', '.join(map(str, paths))} (an experiment=sensitivity run)")
    return found


def _check_bits(record: dict[str, Any], bits: int) -> None:
    if bits not in record["bits"]:
        raise ReportError(f"--sensitivity {bits}: the record measured widths {record['bits']}")


def damage_matrix(record: dict[str, Any], bits: int, damage: str = "nll_delta") -> pd.DataFrame:
    """Blocks (rows) × linear roles (columns, execution order; one "block" column for unit=block)."""
    _check_bits(record, bits)
    cells = {(u["block"], u["role"]): damage_of(u["widths"][str(bits)], damage) for u in record["units"]}
    roles = list(dict.fromkeys(role for _, role in cells))
    blocks = sorted({block for block, _ in cells})
    return pd.DataFrame([[cells.get((b, r)) for r in roles] for b in blocks], index=blocks, columns=roles, dtype=float)


def proxy_ranking(record: dict[str, Any], bits: int) -> pd.DataFrame:
    """Each proxy's Spearman correlation with the measured damage across units at `bits`, and across
    every (unit, width) pair; sorted by the first, best first."""
    _check_bits(record, bits)
    entries = [(u, w, e) for u in record["units"] for w, e in u["widths"].items()]
    proxies = list(dict.fromkeys(p for _, _, e in entries for p in e["proxies"]))
    at = [e for _, w, e in entries if w == str(bits)]
    rows = []
    for proxy in proxies:
        row: dict[str, Any] = {"proxy": proxy}
        for scope, chosen in ((f"at W{bits}", at), ("all widths", [e for _, _, e in entries])):
            for damage, label in DAMAGES.items():
                row[f"ρ vs {label} {scope}"] = spearman([e["proxies"][proxy] for e in chosen],
                                                        [damage_of(e, damage) for e in chosen])
        row["units"] = len(at)
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(f"ρ vs ΔNLL at W{bits}", ascending=False, na_position="last", ignore_index=True)


def most_sensitive(record: dict[str, Any], bits: int, top: int = 10) -> pd.DataFrame:
    """The `top` units by measured ΔNLL at `bits`, with its interval, the KL and the perplexity."""
    _check_bits(record, bits)
    rows = []
    for unit in record["units"]:
        entry = unit["widths"][str(bits)]
        delta = entry["nll_delta"]
        rows.append({"unit": unit["name"], "ΔNLL": delta["mean_nll_delta"], "ci_low": delta["ci_low"],
                     "ci_high": delta["ci_high"], "KL": entry["kl"]["mean_kl"], "ppl": entry["ppl"],
                     "seconds": entry["seconds"]})
    return pd.DataFrame(rows).sort_values("ΔNLL", ascending=False, ignore_index=True).head(top)


def title(record: dict[str, Any], bits: int) -> str:
    spec = record["model"]["spec"]
    return (f"{spec['name']}: {record['method']} W{bits} g{record['group_size']}, one {record['unit']} at a time "
            f"(reference ppl {record['reference']['ppl']:.4g})")
