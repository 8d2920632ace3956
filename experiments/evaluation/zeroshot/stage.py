"""The zero-shot part of one run: which tasks (decided before the model loads), the baseline's
numbers and per-item outcomes (cached with the baseline metrics), and each quantized model's
numbers with their paired differences to the baseline."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from quantlab.experiments.data.sources import data_dir
from quantlab.experiments.evaluation.statistics import task_delta
from quantlab.experiments.store.cache import Cache
from quantlab.methods.base import ConfigError

from .results import means
from .runner import Prompting, TaskRun, evaluate_tasks
from .tasks import ResolvedTask, resolve_tasks

ZEROSHOT_CODE_VERSION = 2  # bump when per-item extraction or metrics change: invalidates cached baselines


def plan_tasks(evaluation: Any) -> list[ResolvedTask]:
    """Resolve eval.tasks (include, local or hub) and check their data is there; raises ConfigError."""
    if not evaluation.tasks:
        return []
    tasks = resolve_tasks(list(evaluation.tasks), data_dir().absolute(), evaluation.task_source,
                          evaluation.include_path)
    local = [t.name for t in tasks if t.source == "local"]
    if (evaluation.num_fewshot or 0) > 0 and local:
        raise ConfigError(
            f"eval.num_fewshot={evaluation.num_fewshot}: the local copies of {', '.join(local)} have no training "
            "split to draw examples from (lm-eval's few-shot source); use eval.num_fewshot=0, the hub, or your "
            "own task YAMLs with a fewshot_split (eval.include_path)"
        )
    return tasks


def prompting(evaluation: Any) -> Prompting:
    """eval.* prompt settings as lm-eval takes them; fewshot_as_multiturn null follows
    apply_chat_template, as on lm-eval's command line (the schema refuses true without it)."""
    multiturn = evaluation.fewshot_as_multiturn
    return Prompting(
        num_fewshot=evaluation.num_fewshot, apply_chat_template=evaluation.apply_chat_template,
        fewshot_as_multiturn=evaluation.apply_chat_template if multiturn is None else multiturn,
        system_instruction=evaluation.system_instruction,
    )


def check_tokenizer(tokenizer: Any, evaluation: Any) -> None:
    """eval.apply_chat_template=true needs a tokenizer with a chat template: refused before any task runs."""
    if evaluation.tasks and evaluation.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "eval.apply_chat_template=true, but the model's tokenizer has no chat template (a base model?); "
            "use eval.apply_chat_template=false"
        )


def task_protocol(task: ResolvedTask, evaluation: Any) -> dict[str, Any]:
    n_total = task.protocol.get("n_items_total")
    return {
        **task.protocol, **asdict(prompting(evaluation)), "limit": evaluation.limit,
        "n_items": min(n_total, evaluation.limit) if (n_total and evaluation.limit) else (evaluation.limit or n_total),
        "batch_size": evaluation.batch_size,
    }


def _run(model: Any, tokenizer: Any, tasks: list[ResolvedTask], evaluation: Any, output_dir: Path | None) -> TaskRun:
    return evaluate_tasks(
        model, tokenizer, tasks, data_dir().absolute(), prompting=prompting(evaluation), limit=evaluation.limit,
        batch_size=evaluation.batch_size, output_dir=output_dir if evaluation.lm_eval_files else None,
    )


def baseline_tasks(
    loaded: Any, evaluation: Any, tasks: list[ResolvedTask], cache_root: Path, output_dir: Path | None = None
) -> tuple[dict[str, dict], float, dict[str, dict]]:
    """{task or group: {"metrics", "items"}} of the full-precision model, each eval.tasks name
    (with its subtasks) cached on its own (keyed by model, task protocol and code version), the
    seconds spent computing, and lm-eval's files of what was computed here (not of cached names)."""
    cache = Cache("baseline", root=cache_root)
    out: dict[str, dict] = {}
    files: dict[str, dict] = {}
    spent = 0.0
    for task in tasks:
        key = {
            "model": loaded.fingerprint, "dtype": str(next(loaded.model.parameters()).dtype),
            "device": loaded.device.type, "task": task_protocol(task, evaluation), "zeroshot_code": ZEROSHOT_CODE_VERSION,
        }

        def compute(task: ResolvedTask = task) -> dict:
            nonlocal spent
            run = _run(loaded.model, loaded.tokenizer, [task], evaluation, output_dir)
            spent += run.seconds
            if run.files is not None:
                files[task.name] = run.files
            return {name: {"metrics": r.metrics, "items": r.items} for name, r in run.results.items()}

        out.update(cache.get_or_compute_json(key, compute))
    return out, spent, files


def _pooled_items(name: str, entries: dict[str, dict]) -> dict[str, list]:
    """A group's per-item outcomes: the items of every task under it, one task after another (ids
    `task/doc_id`), for the per-item metrics all of them have."""
    leaves: list[str] = []

    def walk(group: str) -> None:
        for child in entries[group]["metrics"].get("subtasks") or []:
            if entries[child]["metrics"].get("kind") == "group":
                walk(child)
            else:
                leaves.append(child)

    walk(name)
    if not leaves:
        return {"doc_id": []}
    common = set.intersection(*(set(entries[leaf]["items"]) for leaf in leaves)) - {"doc_id", "loglik"}
    pooled = {"doc_id": [f"{leaf}/{doc}" for leaf in leaves for doc in entries[leaf]["items"]["doc_id"]]}
    for metric in common:
        pooled[metric] = [value for leaf in leaves for value in entries[leaf]["items"][metric]]
    return pooled


def group_deltas(quantized: dict[str, dict], baseline: dict[str, dict]) -> dict[str, dict]:
    """Each group's paired difference to the baseline, over all its tasks' items, for the metrics
    whose group number is the mean of those items (lm-eval's size-weighted aggregate), so the
    difference is the group number's; an unweighted mean over unequal tasks gets none."""
    deltas = {}
    for name, entry in quantized.items():
        if entry["metrics"].get("kind") != "group" or name not in baseline:
            continue
        pooled = _pooled_items(name, quantized)
        exact = set(means(entry["metrics"], pooled))
        delta = task_delta({k: v for k, v in pooled.items() if k == "doc_id" or k in exact},
                           _pooled_items(name, baseline))
        if delta is not None:
            deltas[name] = delta
    return deltas


def quantized_tasks(
    model: Any, tokenizer: Any, evaluation: Any, tasks: list[ResolvedTask], baseline: dict[str, dict],
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """metrics.tasks, metrics.delta, per-item outcomes, seconds and lm-eval's files of the model as
    it is now. Deltas are paired per task, and per group over its tasks' items."""
    run = _run(model, tokenizer, tasks, evaluation, output_dir)
    metrics, deltas, items = {}, {}, {}
    for name, result in run.results.items():
        metrics[name] = result.metrics
        if result.items:
            items[name] = result.items
            if (delta := task_delta(result.items, baseline[name]["items"])) is not None:
                deltas[name] = delta
    deltas.update(group_deltas({n: {"metrics": r.metrics, "items": r.items} for n, r in run.results.items()}, baseline))
    return {"tasks": metrics, "delta": deltas, "items": items, "seconds": run.seconds, "lm_eval_files": run.files}


def baseline_as_quantized(baseline: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """A method that changes no weight (fp16) is the baseline: its numbers, and zero deltas."""
    metrics = {name: dict(entry["metrics"]) for name, entry in baseline.items()}
    items = {name: entry["items"] for name, entry in baseline.items() if entry["items"]}
    deltas = {name: task_delta(entry, entry) for name, entry in items.items()} | group_deltas(baseline, baseline)
    return metrics, {k: v for k, v in deltas.items() if v is not None}, items
