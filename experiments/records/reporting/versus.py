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

Replicates (`--replicates mean`, the default: runs that differ only in seed / calib.seed) are paired
seed by seed, and each set becomes one row: the per-seed ratios, and a pooled interval over the
windows they share (`pool_seeds`). `--replicates latest` pairs every entry alone, as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quantlab.experiments.evaluation.statistics import paired_delta
from quantlab.experiments.records.reporting.records import ReportError, is_null, warn
from quantlab.experiments.records.reporting.replicates import (
    MODES,
    SEED_COLUMNS,
    per_seed_text,
    sample_sd,
    seed_label,
)

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


def _pair(row: pd.Series, references: pd.DataFrame, keys: list[str], reference: str, dataset: str,
          cache: dict[str, dict]) -> dict[str, Any] | None:
    """`row` against its reference entry (the same keys; a `compare_with` entry of the same run
    first, else the latest), paired window by window; None when no reference has its windows."""
    candidates = references[_same(references, row, keys)]
    if candidates.empty:
        return None
    same_run = candidates[candidates["run_dir"].eq(row["run_dir"])]
    ref = (same_run if not same_run.empty else candidates.sort_values("finished_at")).iloc[-1]
    ours = _window_nll(row["record_path"], int(row["entry_index"]), dataset, cache) or []
    theirs = _window_nll(ref["record_path"], int(ref["entry_index"]), dataset, cache) or []
    delta = paired_delta(ours, theirs)
    if delta is None:
        return None
    return {
        "model": row["model"], "method": row["method"], "method_options": row["method_options"],
        "bits": row["bits"], "group_size": row["group_size"], "avg_bits": row["avg_bits"],
        f"ppl_{dataset}": row[f"ppl_{dataset}"], "reference": f"{reference} W{ref['bits']} g{ref['group_size']}",
        "reference_options": ref["method_options"], "reference_avg_bits": ref["avg_bits"],
        f"reference_ppl_{dataset}": ref[f"ppl_{dataset}"], "ppl_ratio": delta["ppl_ratio"],
        "ratio_ci_low": math.exp(delta["ci_low"]), "ratio_ci_high": math.exp(delta["ci_high"]), "n_windows": len(ours),
        "same_run": not same_run.empty, "run_dir": row["run_dir"], "seed": row["seed"], "calib_seed": row["calib_seed"],
        # which replicate set the pair belongs to, and the windows to pool across seeds
        "_set": (row["replicate_of"], row["entry_index"], ref["replicate_of"], ref["entry_index"]),
        "_ours": ours, "_theirs": theirs,
    }


def versus_table(runs: pd.DataFrame, reference: str, dataset: str, match: list[str] | None = None,
                 replicates: str = "mean") -> pd.DataFrame:
    """One row per selected entry that is not `reference` and has a reference entry under the
    same protocol: both perplexities and bits per weight, and the paired ratio with its interval.

    With `replicates="mean"`, entries are paired seed by seed (the same `seed` and `calib_seed`)
    and each set of replicates becomes one row (`pool_seeds`); "latest" pairs each entry alone."""
    keys = list(MATCH_KEYS if match is None else match)
    unknown = [k for k in keys if k not in runs.columns]
    if unknown:
        raise ReportError(f"--match {','.join(unknown)}: not a column; choose from {', '.join(MATCH_KEYS)}")
    if replicates not in MODES:
        raise ReportError(f"--replicates {replicates!r}: expected one of {', '.join(MODES)}")
    seeds = [k for k in SEED_COLUMNS if k not in keys] if replicates == "mean" else []
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
        pair = _pair(row, references, keys + seeds + protocol, reference, dataset, cache)
        if pair is None:
            unmatched += 1
            continue
        rows.append(pair)
    if unmatched:
        warn(f"--versus {reference}: {unmatched} entr{'y' if unmatched == 1 else 'ies'} had no {reference} entry "
             f"under the same protocol ({', '.join(keys + seeds)}, {dataset} windows)")
    if not rows:
        raise ReportError(f"--versus {reference}: no entry could be paired with a {reference} entry "
                          f"(matching {', '.join(keys + seeds)} and the {dataset} windows; --match loosens it)")
    table = pd.DataFrame(rows)
    table = pool_seeds(table, dataset) if replicates == "mean" else table.assign(replicates=1, seed_ratios=None)
    return table.drop(columns=["_set", "_ours", "_theirs"])


def pool_seeds(pairs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per replicate set of seed-by-seed pairs: the per-seed ratios (`seed_ratios`, their
    sample sd `ratio_seed_sd`) and a pooled paired interval.

    Replicates share the evaluation windows (they are fixed by the protocol, not the seed), so each
    window's NLL difference is averaged over the seeds and the t interval runs over windows: the
    pooled ratio exp(mean difference) is the geometric mean of the per-seed ratios. Entries
    without replicates (or without `replicate_of`) are left as they are."""
    out = []
    for _, group in pairs.groupby(pairs["_set"].map(str), sort=False):
        lengths = {len(w) for w in group["_ours"]} | {len(w) for w in group["_theirs"]}
        if len(group) == 1 or is_null(group["_set"].iloc[0][0]) or len(lengths) != 1:
            out.extend(group.assign(replicates=1, seed_ratios=None).to_dict("records"))
            continue
        delta = paired_delta(np.mean(np.stack(group["_ours"].map(np.asarray)), axis=0).tolist(),
                             np.mean(np.stack(group["_theirs"].map(np.asarray)), axis=0).tolist())
        varying = [k for k in SEED_COLUMNS if group[k].nunique(dropna=False) > 1]
        labels = [seed_label(row, varying) for _, row in group.iterrows()]
        pooled = group.iloc[-1].to_dict()
        pooled.update({
            f"ppl_{dataset}": group[f"ppl_{dataset}"].mean(), "avg_bits": group["avg_bits"].mean(),
            f"reference_ppl_{dataset}": group[f"reference_ppl_{dataset}"].mean(),
            "reference_avg_bits": group["reference_avg_bits"].mean(),
            "ppl_ratio": delta["ppl_ratio"], "ratio_ci_low": math.exp(delta["ci_low"]),
            "ratio_ci_high": math.exp(delta["ci_high"]), "same_run": bool(group["same_run"].all()),
            "replicates": len(group), "seed_ratios": per_seed_text(group["ppl_ratio"], labels),
            "ratio_seed_sd": sample_sd(group["ppl_ratio"]), "run_dir": ";".join(group["run_dir"]),
            **{key: None for key in varying},
        })
        out.append(pooled)
    return pd.DataFrame(out)


def format_versus(table: pd.DataFrame, dataset: str, digits: int) -> pd.DataFrame:
    """Human-readable columns: ppl, bits per weight, ratio [ci_low, ci_high]; with pooled
    replicates, the number of seeds and the per-seed ratios."""
    def num(value: Any, d: int = digits) -> str:
        return "-" if pd.isna(value) else f"{float(value):.{d}f}"

    columns = pd.DataFrame({
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
    if table["replicates"].gt(1).any():  # the seeds behind pooled rows, and each seed's own ratio
        columns["seeds"] = table["replicates"]
        columns["per-seed ratios"] = table["seed_ratios"].map(lambda text: "-" if is_null(text) else text)
    return columns
