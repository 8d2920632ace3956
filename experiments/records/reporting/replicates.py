"""Replicates: runs of one experiment that differ only in `seed` and/or `calib.seed`.

`quantlab-report --replicates mean` (the default) folds each set of replicates into one entry:
every measured figure (perplexity, paired ratio to fp16, timings) becomes its mean, beside the
sample standard deviation (`<column>_sd`), the number of seeds (`replicates`) and the per-seed
values (`<column>_per_seed`, "seed=0:12.31;seed=1:12.45"). A single seed is left as it is, with its
95% interval. `--replicates latest` keeps every replicate as its own entry, so a table cell shows
the latest one (the behaviour before replicates were folded).

Replicates are recognised by `replicate_of` (records.py: the config hash without the two seeds),
the method entry and its bits and group size; only finished `ok` entries are folded.
"""

from __future__ import annotations

import math

import pandas as pd

from quantlab.experiments.records.reporting.metrics import datasets
from quantlab.experiments.records.reporting.records import ReportError

MODES = ("mean", "latest")
SEED_COLUMNS = ["seed", "calib_seed"]
GROUP_KEY = ["replicate_of", "entry_index", "method", "method_options", "bits", "group_size"]
REPLICATES = "replicates"  # column: how many seeds an entry stands for (1: a single run)
TIMINGS = ["quantize_s", "eval_s"]


def measured_columns(frame: pd.DataFrame) -> list[str]:
    """The figures that vary from seed to seed and get mean, sd and per-seed values."""
    found = [c for ds in datasets(frame) for c in (f"ppl_{ds}", f"ppl_ratio_{ds}")] + TIMINGS
    return [c for c in found if c in frame.columns]


def seed_label(row: pd.Series, varying: list[str]) -> str:
    """"seed=1", "calib_seed=2" or "seed=1/calib_seed=2": the seeds that tell replicates apart."""
    return "/".join(f"{key}={row[key]}" for key in varying)


def per_seed_text(values: pd.Series, labels: list[str]) -> str:
    return ";".join(f"{label}:{value:.6g}" for label, value in zip(labels, values) if not pd.isna(value))


def sample_sd(values: pd.Series) -> float:
    """Sample standard deviation (n - 1) of the non-missing values; NaN below two of them."""
    present = values.dropna()
    return float(present.std(ddof=1)) if len(present) > 1 else math.nan


def fold(group: pd.DataFrame, measured: list[str]) -> pd.Series:
    """One entry standing for `group`'s replicates: the latest run's fields, measured figures averaged."""
    group = group.sort_values(["finished_at", "started_at"], na_position="first", kind="stable")
    varying = [k for k in SEED_COLUMNS if group[k].nunique(dropna=False) > 1]
    labels = [seed_label(row, varying) for _, row in group.iterrows()]
    folded = group.iloc[-1].copy()
    for column in group.columns:
        if column in measured or column in SEED_COLUMNS or column == REPLICATES:
            continue
        if pd.api.types.is_float_dtype(group[column]):  # avg_bits, bytes, baselines: equal or nearly
            folded[column] = group[column].mean()
    for column in measured:
        folded[column] = group[column].mean()
        folded[f"{column}_sd"] = sample_sd(group[column])
        folded[f"{column}_per_seed"] = per_seed_text(group[column], labels)
        for bound in ("_ci_low", "_ci_high"):  # one run's window interval: the seeds' spread replaces it
            if f"{column}{bound}" in folded.index:
                folded[f"{column}{bound}"] = math.nan
    for key in varying:
        folded[key] = None
    folded[REPLICATES] = len(group)
    folded["run_dir"] = ";".join(group["run_dir"])
    return folded


def combine_replicates(runs: pd.DataFrame, mode: str = "mean") -> pd.DataFrame:
    """`runs` (load_runs, then select) with each set of replicates folded into one entry (`mean`),
    or unchanged (`latest`); both add the `replicates` column (1 for an entry that stands alone)."""
    if mode not in MODES:
        raise ReportError(f"--replicates {mode!r}: expected one of {', '.join(MODES)}")
    runs = runs.assign(**{REPLICATES: 1})
    if mode == "latest" or runs.empty:
        return runs
    measured = measured_columns(runs)
    foldable = runs["status"].eq("ok") & runs["replicate_of"].notna()
    # one text per entry; a missing value reads "None" (astype(str) keeps NaN as NaN in pandas 3)
    keys = runs[GROUP_KEY].apply(lambda row: "|".join("None" if pd.isna(v) else str(v) for v in row), axis=1)
    pieces = []
    for _, group in runs.groupby(keys.where(foldable, None), sort=False, dropna=True):
        pieces.append(fold(group, measured).to_frame().T if len(group) > 1 else group)
    pieces.append(runs[~foldable])
    combined = pd.concat(pieces, ignore_index=True)
    for column in runs.columns:  # concat with folded (object) rows loses the dtypes load_runs set
        if str(runs[column].dtype) != "object":
            combined[column] = combined[column].astype(runs[column].dtype)
    for column in measured:
        if f"{column}_sd" in combined:
            combined[f"{column}_sd"] = combined[f"{column}_sd"].astype(float)
    return combined


def has_folded(runs: pd.DataFrame) -> bool:
    """Whether any entry of `runs` stands for several seeds."""
    return REPLICATES in runs and bool(runs[REPLICATES].gt(1).any())
