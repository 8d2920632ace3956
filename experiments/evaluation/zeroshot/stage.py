"""The zero-shot part of one run: which tasks (decided before the model loads), the baseline's
numbers and per-item outcomes (cached with the baseline metrics), and each quantized model's
numbers with their paired differences to the baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.data.sources import data_dir
from experiments.evaluation.statistics import task_delta
from experiments.store.cache import Cache
from methods.base import ConfigError

from .runner import evaluate_tasks
from .tasks import ResolvedTask, resolve_tasks

ZEROSHOT_CODE_VERSION = 1  # bump when per-item extraction or metrics change: invalidates cached baselines


def plan_tasks(evaluation: Any) -> list[ResolvedTask]:
    """Resolve eval.tasks (local or hub) and check their data is there; raises ConfigError."""
    if not evaluation.tasks:
        return []
    tasks = resolve_tasks(list(evaluation.tasks), data_dir().absolute(), evaluation.task_source)
    local = [t.name for t in tasks if t.source == "local"]
    if evaluation.num_fewshot > 0 and local:
        raise ConfigError(
            f"eval.num_fewshot={evaluation.num_fewshot}: the local copies of {', '.join(local)} have no training "
            "split to draw examples from (lm-eval's few-shot source); use eval.num_fewshot=0 or the hub"
        )
    return tasks


def task_protocol(task: ResolvedTask, evaluation: Any) -> dict[str, Any]:
    n_total = task.protocol.get("n_items_total")
    return {
        **task.protocol, "num_fewshot": evaluation.num_fewshot, "limit": evaluation.limit,
        "n_items": min(n_total, evaluation.limit) if (n_total and evaluation.limit) else (evaluation.limit or n_total),
        "batch_size": evaluation.batch_size,
    }


def _run(model: Any, tokenizer: Any, tasks: list[ResolvedTask], evaluation: Any):
    return evaluate_tasks(
        model, tokenizer, tasks, data_dir().absolute(), num_fewshot=evaluation.num_fewshot,
        limit=evaluation.limit, batch_size=evaluation.batch_size,
    )


def baseline_tasks(
    loaded: Any, evaluation: Any, tasks: list[ResolvedTask], cache_root: Path
) -> tuple[dict[str, dict], float]:
    """{task: {"metrics", "items"}} of the full-precision model, each task cached on its own
    (keyed by model, task protocol and code version), and the seconds spent computing."""
    cache = Cache("baseline", root=cache_root)
    out: dict[str, dict] = {}
    spent = 0.0
    for task in tasks:
        key = {
            "model": loaded.fingerprint, "dtype": str(next(loaded.model.parameters()).dtype),
            "device": loaded.device.type, "task": task_protocol(task, evaluation), "zeroshot_code": ZEROSHOT_CODE_VERSION,
        }

        def compute(task: ResolvedTask = task) -> dict:
            nonlocal spent
            results, seconds = _run(loaded.model, loaded.tokenizer, [task], evaluation)
            spent += seconds
            return {"metrics": results[task.name].metrics, "items": results[task.name].items}

        out[task.name] = cache.get_or_compute_json(key, compute)
    return out, spent


def quantized_tasks(
    model: Any, tokenizer: Any, evaluation: Any, tasks: list[ResolvedTask], baseline: dict[str, dict]
) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict], float]:
    """(metrics.tasks, metrics.delta, per-item outcomes, seconds) of the model as it is now."""
    results, seconds = _run(model, tokenizer, tasks, evaluation)
    metrics, deltas, items = {}, {}, {}
    for name, result in results.items():
        metrics[name] = result.metrics
        items[name] = result.items
        delta = task_delta(result.items, baseline[name]["items"])
        if delta is not None:
            deltas[name] = delta
    return metrics, deltas, items, seconds


def baseline_as_quantized(baseline: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """A method that changes no weight (fp16) is the baseline: its numbers, and zero deltas."""
    metrics = {name: dict(entry["metrics"]) for name, entry in baseline.items()}
    items = {name: entry["items"] for name, entry in baseline.items()}
    deltas = {name: task_delta(entry["items"], entry["items"]) for name, entry in baseline.items()}
    return metrics, {k: v for k, v in deltas.items() if v is not None}, items
