"""lm-eval's output turned into quantlab's entries: one per task and one per group, each with its
metrics as lm-eval computed them and, for tasks, the per-item outcomes the paired statistics need.

lm-eval reports `results[name]["metric,filter"]`: the metric under each filter of the task (a
generative task such as gsm8k has several, e.g. `strict-match` and `flexible-extract`). A group
(mmlu) has an entry of its own, its metrics aggregated by lm-eval over its subtasks
(`group_subtasks`); only the tasks have per-item samples. Values are recorded as lm-eval gave them:
numbers as floats, text as text, anything else left out with the reason under `skipped`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from quantlab.experiments.evaluation.statistics import mean_stderr

BOOKKEEPING = ("alias", "name", "sample_len", "sample_count")  # lm-eval's labels, not metrics
LOGLIK_TYPES = ("loglikelihood", "multiple_choice")  # tasks decided on log-likelihoods
NOT_ITEM_METRICS = ("doc_id", "loglik")


@dataclass
class TaskResult:
    """One task's or group's numbers and, for a task, the per-item outcomes they come from
    (aligned by doc_id)."""

    name: str
    metrics: dict[str, Any]  # acc, stderr, acc_norm, ..., n, kind, config, (group | subtasks), skipped
    items: dict[str, list] = field(default_factory=dict)  # doc_id, one list per metric, loglik


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metric_name(key: str) -> str:
    """lm-eval's `metric,filter` as recorded: the metric alone under the default filter (`none`),
    `metric,filter` under any other; acc's standard error keeps its name `stderr`."""
    metric, _, filter_name = key.partition(",")
    name = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
    return "stderr" if name == "acc_stderr" else name


def stderr_name(name: str) -> str:
    """The recorded name of a recorded metric's standard error."""
    metric, comma, filter_name = name.partition(",")
    return metric_name(f"{metric}_stderr{comma}{filter_name}")


def per_item(samples: list[dict[str, Any]], output_type: str | None) -> dict[str, list]:
    """The per-item outcomes of one task from lm-eval's logged samples (one sample per item and
    filter): doc ids, every numeric per-item metric under its recorded name, and for log-likelihood
    tasks each choice's log-likelihood (what acc is decided on)."""
    by_filter: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_filter.setdefault(sample.get("filter", "none"), []).append(sample)
    items: dict[str, list] = {}
    for filter_name, group in by_filter.items():
        group.sort(key=lambda s: s["doc_id"])
        doc_ids = [int(s["doc_id"]) for s in group]
        if items.setdefault("doc_id", doc_ids) != doc_ids:
            raise ValueError(f"lm-eval's filter {filter_name!r} scored other documents than the task's other filters")
        for metric in group[0].get("metrics") or [m for m in ("acc", "acc_norm") if m in group[0]]:
            values = [s.get(metric) for s in group]
            if all(_number(v) for v in values):  # 0/1 outcomes, scores; not corpus metrics' (ref, pred) pairs
                items[metric_name(f"{metric},{filter_name}")] = [float(v) for v in values]
    if output_type in LOGLIK_TYPES and by_filter:
        first = by_filter.get("none") or next(iter(by_filter.values()))
        items["loglik"] = [[float(resp[0]) for resp in s["filtered_resps"]] for s in first]
    return items


def means(metrics: dict[str, Any], items: dict[str, list]) -> list[str]:
    """The per-item metrics whose mean is lm-eval's number (acc, exact_match): their paired
    differences are differences of the task's metric. Others (LAMBADA's per-item log-likelihood
    behind its perplexity) are not."""
    return [
        name for name, values in items.items()
        if name not in NOT_ITEM_METRICS and values and isinstance(metrics.get(name), float)
        and abs(sum(values) / len(values) - metrics[name]) <= 1e-9
    ]


def entry_metrics(lm_results: dict[str, Any], items: dict[str, list]) -> dict[str, Any]:
    """lm-eval's metrics of one task or group, under their recorded names. A standard error lm-eval
    left out ('N/A': quantlab runs it without its bootstrap) is computed here from the per-item
    values, lm-eval's mean_stderr, when the metric is their mean; otherwise it is skipped, saying why."""
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for key, value in lm_results.items():
        if key in BOOKKEEPING:
            continue
        name = metric_name(key)
        if _number(value):
            metrics[name] = float(value)
        elif isinstance(value, str) and value != "N/A":
            metrics[name] = value  # a metric lm-eval reports as text: kept as it is
        elif value == "N/A":
            skipped[name] = "lm-eval reports no value ('N/A'; its bootstrap is off) and it is not a mean of per-item values"
        else:
            skipped[name] = f"not a finite number or text: {type(value).__name__} {str(value)[:80]}"
    for name in means(metrics, items):
        if (stderr := mean_stderr(items[name])) is not None:
            metrics[stderr_name(name)] = stderr
            skipped.pop(stderr_name(name), None)
    if skipped:
        metrics["skipped"] = skipped
    return metrics


def task_config(out: dict[str, Any], name: str) -> dict[str, Any]:
    """How lm-eval ran a task: output type, shots, and for generation the settings and filters."""
    config = (out.get("configs") or {}).get(name) or {}
    recorded: dict[str, Any] = {"output_type": config.get("output_type"), "num_fewshot": (out.get("n-shot") or {}).get(name)}
    if config.get("output_type") == "generate_until":
        recorded["generation_kwargs"] = config.get("generation_kwargs")
        recorded["filters"] = [f.get("name") for f in config.get("filter_list") or []] or ["none"]
    return recorded


def _is_stderr(name: str) -> bool:
    return name == "stderr" or "_stderr" in name


def _group_stderrs(metrics: dict[str, Any], leaves: list[TaskResult], weight_by_size: dict[str, bool]) -> None:
    """A group's missing standard errors from its tasks' ones, with lm-eval's own pooling: the
    pooled stderr for a size-weighted mean (its default), the unweighted one otherwise."""
    from lm_eval.api.metrics import pooled_sample_stderr, unweighted_mean_stderr

    for name in [n for n, v in metrics.items() if isinstance(v, float) and not _is_stderr(n)]:
        key = stderr_name(name)
        stderrs = [leaf.metrics.get(key) for leaf in leaves]
        if key in metrics or not leaves or not all(_number(s) for s in stderrs):
            continue
        if weight_by_size.get(name.partition(",")[0], True):
            metrics[key] = float(pooled_sample_stderr(stderrs, [leaf.metrics["n"] for leaf in leaves]))
        else:
            metrics[key] = float(unweighted_mean_stderr(stderrs))
        metrics.get("skipped", {}).pop(key, None)
    if metrics.get("skipped") == {}:
        del metrics["skipped"]


def collect(
    out: dict[str, Any], requested: list[str], weight_by_size: dict[str, dict[str, bool]] | None = None
) -> dict[str, TaskResult]:
    """Every task and group under the requested names, groups after their subtasks. A task names
    its group (`group`), a group its direct subtasks (`subtasks`) and its size (`n`, over its tasks).
    `weight_by_size`: {group: {metric: weighted?}} from the groups' aggregate_metric_list."""
    samples, subtasks = out.get("samples") or {}, out.get("group_subtasks") or {}
    results: dict[str, TaskResult] = {}

    def visit(name: str, parent: str | None) -> list[TaskResult]:
        if name in subtasks and name not in samples:  # a group: lm-eval aggregated it over its tasks
            leaves = [leaf for child in subtasks[name] for leaf in visit(child, name)]
            metrics = entry_metrics(out["results"].get(name, {}), {})
            _group_stderrs(metrics, leaves, (weight_by_size or {}).get(name, {}))
            metrics.update(n=sum(leaf.metrics["n"] for leaf in leaves), kind="group", subtasks=list(subtasks[name]),
                           config={"num_fewshot": (out.get("n-shot") or {}).get(name)})
            if parent:
                metrics["group"] = parent
            results[name] = TaskResult(name, metrics)
            return leaves
        if name not in samples:
            raise KeyError(f"lm-eval returned no samples for task {name!r}")
        config = task_config(out, name)
        items = per_item(samples[name], config["output_type"])
        metrics = entry_metrics(out["results"][name], items)
        kept = set(means(metrics, items)) | set(NOT_ITEM_METRICS)
        items = {key: values for key, values in items.items() if key in kept}
        metrics.update(n=len(items.get("doc_id", [])), kind="task", config=config)
        if parent:
            metrics["group"] = parent
        results[name] = TaskResult(name, metrics, items)
        return [results[name]]

    for name in requested:
        if name in samples or name in subtasks:
            visit(name, None)
    for name in samples:  # a tag (e.g. ai2_arc) expands into tasks that no requested name is
        if name not in results:
            visit(name, None)
    return results
