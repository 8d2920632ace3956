"""Method against method, paired on the same windows: `quantlab-report --versus gptq`.

For each selected entry, the reference method's entry evaluated under the same protocol (model,
calibration set, bits, group size, the dataset's sequence length and window count) is found, and
the two are compared window by window: the paired PPL ratio (exp of the mean NLL difference) with
its 95% t interval, far tighter than two independent intervals since window difficulty cancels.
A reference run inside the same run (`compare_with`) is preferred; otherwise the latest finished.

An entry whose widths an allocation chose (`allocation=` in its method options) is never a
reference: `--versus gptq` pairs an allocated GPTQ run with the uniform GPTQ run at the same bits
(README, "Sensitivity and allocation").

`--versus gptq --match bits` matches on fewer keys (e.g. VPTQ, whose group size means nothing,
against GPTQ at the same nominal bits); the table always shows both sides' exact bits per weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.evaluation.statistics import paired_delta
from experiments.records.reporting.records import ReportError, warn

# Keys two entries must share to be compared, beyond the evaluation protocol.
MATCH_KEYS = ["model", "calib_dataset", "calib_nsamples", "calib_seqlen", "calib_seed", "bits", "group_size"]


def _window_nll(record_path: str, entry_index: int, dataset: str, cache: dict[str, dict]) -> list[float] | None:
    if record_path not in cache:
        cache[record_path] = json.loads(Path(record_path).read_text())
    record = cache[record_path]
    entry = record if entry_index == 0 else (record.get("comparisons") or [])[entry_index - 1]
    ppl = ((entry.get("metrics") or {}).get("ppl") or {}).get(dataset) or {}
    return ppl.get("window_nll")


def _same(frame: pd.DataFrame, row: pd.Series, keys: list[str]) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for key in keys:
        value = row.get(key)
        mask &= frame[key].isna() if pd.isna(value) else frame[key].eq(value)
    return mask


def versus_table(runs: pd.DataFrame, reference: str, dataset: str, match: list[str] | None = None) -> pd.DataFrame:
    """One row per selected entry that is not `reference` and has a reference entry under the
    same protocol: both perplexities and bits per weight, and the paired ratio with its interval."""
    keys = list(MATCH_KEYS if match is None else match)
    unknown = [k for k in keys if k not in runs.columns]
    if unknown:
        raise ReportError(f"--match {','.join(unknown)}: not a column; choose from {', '.join(MATCH_KEYS)}")
    protocol = [f"ppl_{dataset}_seqlen", f"ppl_{dataset}_n_windows"]
    if f"ppl_{dataset}" not in runs.columns:
        raise ReportError(f"no entry has a perplexity on {dataset!r} (--metric ppl:<dataset>)")
    allocated = runs["method_options"].fillna("").str.contains("allocation=", regex=False)
    references = runs[runs["method"].eq(reference) & ~allocated & runs[f"ppl_{dataset}"].notna()]
    if references.empty:
        raise ReportError(f"--versus {reference}: no selected entry of method {reference!r} with {dataset} perplexity")
    cache: dict[str, dict] = {}
    rows, unmatched = [], 0
    for _, row in runs[(runs["method"].ne(reference) | allocated) & runs[f"ppl_{dataset}"].notna()].iterrows():
        candidates = references[_same(references, row, keys + protocol)]
        if candidates.empty:
            unmatched += 1
            continue
        same_run = candidates[candidates["run_dir"].eq(row["run_dir"])]
        ref = (same_run if not same_run.empty else candidates.sort_values("finished_at")).iloc[-1]
        ours = _window_nll(row["record_path"], int(row["entry_index"]), dataset, cache)
        theirs = _window_nll(ref["record_path"], int(ref["entry_index"]), dataset, cache)
        delta = paired_delta(ours or [], theirs or [])
        if delta is None:
            unmatched += 1
            continue
        rows.append({
            "model": row["model"], "method": row["method"], "method_options": row["method_options"],
            "bits": row["bits"], "group_size": row["group_size"], "avg_bits": row["avg_bits"],
            f"ppl_{dataset}": row[f"ppl_{dataset}"], "reference": f"{reference} W{ref['bits']} g{ref['group_size']}",
            "reference_options": ref["method_options"], "reference_avg_bits": ref["avg_bits"],
            f"reference_ppl_{dataset}": ref[f"ppl_{dataset}"], "ppl_ratio": delta["ppl_ratio"],
            "ratio_ci_low": math.exp(delta["ci_low"]), "ratio_ci_high": math.exp(delta["ci_high"]), "n_windows": len(ours or []),
            "same_run": not same_run.empty, "run_dir": row["run_dir"],
        })
    if unmatched:
        warn(f"--versus {reference}: {unmatched} entr{'y' if unmatched == 1 else 'ies'} had no {reference} entry "
             f"under the same protocol ({', '.join(keys)}, {dataset} windows)")
    if not rows:
        raise ReportError(f"--versus {reference}: no entry could be paired with a {reference} entry "
                          f"(matching {', '.join(keys)} and the {dataset} windows; --match loosens it)")
    return pd.DataFrame(rows)


def format_versus(table: pd.DataFrame, dataset: str, digits: int) -> pd.DataFrame:
    """Human-readable columns: ppl, bits per weight, ratio [ci_low, ci_high]."""
    def num(value: Any, d: int = digits) -> str:
        return "-" if pd.isna(value) else f"{float(value):.{d}f}"

    return pd.DataFrame({
        "model": table["model"], "method": table["method"], "options": table["method_options"],
        "bits": table["bits"], "group_size": table["group_size"], "bits/weight": table["avg_bits"].map(lambda v: num(v, 3)),
        f"ppl {dataset}": table[f"ppl_{dataset}"].map(num), "vs": table["reference"],
        "vs bits/weight": table["reference_avg_bits"].map(lambda v: num(v, 3)),
        f"vs ppl {dataset}": table[f"reference_ppl_{dataset}"].map(num),
        "PPL ratio (paired, 95%)": [
            f"{r:.4f} [{lo:.4f}, {hi:.4f}]" for r, lo, hi in
            zip(table["ppl_ratio"], table["ratio_ci_low"], table["ratio_ci_high"])
        ],
        "windows": table["n_windows"], "same run": table["same_run"].map({True: "yes", False: "no"}),
    })
