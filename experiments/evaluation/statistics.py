"""Uncertainty of perplexities and zero-shot accuracies, and paired comparisons on the same windows / items.

Two accuracies measured on the same items are strongly correlated (the hard items are hard for
both models), so comparing two independent intervals grossly overstates the uncertainty of their
difference. The paired bootstrap resamples *items*, keeping each item's pair of outcomes together:
its interval is for the difference itself, and it collapses to exactly zero for a model compared
with itself. The seed is fixed, so the same two runs always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def t_quantile_975(dof: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:  # scipy comes with lm-eval's dependencies; the normal value is the fallback
        return 1.959964


def paired_delta(quantized: list[float], baseline: list[float]) -> dict | None:
    """Mean NLL difference (quantized - baseline) over the same windows, with a t interval: far
    tighter than comparing two independent PPL intervals, since window difficulty cancels."""
    if len(quantized) != len(baseline) or len(quantized) < 2:
        return None
    diffs = [q - b for q, b in zip(quantized, baseline)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean_nll_delta": mean, "ci_low": mean - half, "ci_high": mean + half, "ppl_ratio": math.exp(mean)}


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation / sqrt(n), lm-eval's `mean_stderr`."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def paired_bootstrap(
    quantized: Sequence[float], baseline: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED, confidence: float = 0.95,
) -> dict[str, float | int | bool]:
    """Mean difference (quantized - baseline) over the same items, with a percentile bootstrap
    interval, and how many items flipped each way (for 0/1 outcomes).

    A bootstrap resample's mean depends only on how many times each distinct difference value is
    drawn, so the resamples are drawn as multinomial counts over the distinct values: the same
    distribution as resampling item indices, in O(resamples x distinct values) instead of
    O(resamples x items) (accuracy differences take at most the three values -1, 0, 1)."""
    if len(quantized) != len(baseline):
        raise ValueError(f"paired comparison needs the same items: {len(quantized)} vs {len(baseline)}")
    n = len(quantized)
    if n == 0:
        raise ValueError("paired comparison of zero items")
    diffs = np.asarray(quantized, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    values, counts = np.unique(diffs, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=resamples)
    means = draws @ values / n
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    value = float(diffs.mean())
    # quantiles of identical numbers can come back one ulp off; a zero-spread sample has a zero-width interval
    if len(values) == 1:
        low = high = value
    gained = int(sum(1 for q, b in zip(quantized, baseline) if q > b))
    lost = int(sum(1 for q, b in zip(quantized, baseline) if q < b))
    return {
        "value": value, "ci_low": float(low), "ci_high": float(high), "n": n, "gained": gained, "lost": lost,
        "significant": bool(high < 0 or low > 0), "resamples": resamples, "seed": seed,
    }


def align(quantized_ids: Sequence[int], baseline_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Index pairs (i_quantized, i_baseline) of the items both runs evaluated, by doc_id."""
    where = {doc_id: i for i, doc_id in enumerate(baseline_ids)}
    return [(i, where[doc_id]) for i, doc_id in enumerate(quantized_ids) if doc_id in where]


def task_delta(quantized_items: dict[str, list], baseline_items: dict[str, list]) -> dict | None:
    """Paired difference of one task's per-item metrics to the baseline's on the same items: acc at
    the top level, every other one both have (acc_norm, exact_match, ...) nested under its name."""
    pairs = align(quantized_items["doc_id"], baseline_items["doc_id"])
    if not pairs:
        return None
    out: dict = {}
    for metric in quantized_items:
        if metric not in ("doc_id", "loglik") and metric in baseline_items:
            q = [quantized_items[metric][i] for i, _ in pairs]
            b = [baseline_items[metric][j] for _, j in pairs]
            delta = paired_bootstrap(q, b)
            if metric == "acc":
                out.update(metric="acc", **delta)
            else:
                out[metric] = delta
    return out or None


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values`, ties sharing the mean of the ranks they span (scipy's rankdata
    'average'): [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (so ties are
    handled as scipy.stats.spearmanr does). None when fewer than 2 pairs or a side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs: {len(x)} x values, {len(y)} y values")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
