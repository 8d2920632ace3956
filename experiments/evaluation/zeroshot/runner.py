"""Zero-shot accuracy through lm-eval itself, on the in-memory (quantized) model.

`lm_eval.simple_evaluate` runs on `HFLM(pretrained=<model object>)`, so the model evaluated is the
one just quantized, with no checkpoint written in between, and the requests, scoring and metrics
are lm-eval's own. Per-item results (lm-eval's `log_samples`) are kept: they are what the paired
comparison with the baseline needs, and the baseline's are cached with its metrics.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .results import TaskResult, collect
from .tasks import ResolvedTask, task_manager


@dataclass(frozen=True)
class Prompting:
    """How lm-eval builds each prompt (eval.num_fewshot, eval.apply_chat_template,
    eval.fewshot_as_multiturn, eval.system_instruction); recorded in each task's protocol."""

    num_fewshot: int | None = 0  # None: each task's own default
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False  # few-shot examples as chat turns: only inside a chat template
    system_instruction: str | None = None


@dataclass
class TaskRun:
    """One simple_evaluate call: an entry per task and group, the seconds, and lm-eval's own
    results and samples files (with output_dir), or why they are not there."""

    results: dict[str, TaskResult]
    seconds: float
    files: dict[str, Any] | None = None


@contextmanager
def quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs a warning per task and per request type; the run's own log says what ran."""
    logger = logging.getLogger("lm_eval")
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextmanager
def kept_random_state():
    """simple_evaluate seeds python, numpy and torch globally; a method quantized after it (a
    comparison) must see the same random state as without zero-shot tasks."""
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def _group_weighting(manager: Any, groups: Any) -> dict[str, dict[str, bool]]:
    """{group: {metric: weight_by_size}} from each group's aggregate_metric_list (lm-eval's default:
    weighted by size), for the groups' standard errors."""
    weighting = {}
    for group in groups:
        entry = manager.task_index.get(group)
        aggregates = ((entry.cfg if entry is not None else None) or {}).get("aggregate_metric_list") or []
        aggregates = [aggregates] if isinstance(aggregates, dict) else aggregates
        weighting[group] = {a["metric"]: bool(a.get("weight_by_size", True)) for a in aggregates if "metric" in a}
    return weighting


def write_lm_eval_files(tracker: Any, out: dict[str, Any], samples: dict[str, list], folder: Path) -> dict[str, Any]:
    """lm-eval's results file and one samples file per task, written by its EvaluationTracker as
    its command line writes them (readable by lm-eval's tools). The tracker only logs a warning
    when it cannot write, so the files are checked: {"results", "samples": {task: path}} or
    {"error": why}."""
    tracker.save_results_aggregated(results=dict(out), samples=samples)
    for task in out["configs"]:  # after per_item: the tracker rewrites the samples it saves
        tracker.save_results_samples(task_name=task, samples=samples[task])
    date = getattr(tracker, "date_id", None)
    files = {"results": folder / f"results_{date}.json",
             "samples": {task: folder / f"samples_{task}_{date}.jsonl" for task in out["configs"]}}
    missing = [str(p) for p in [files["results"], *files["samples"].values()] if not p.is_file()]
    if date is None or missing:
        return {"error": f"lm-eval's EvaluationTracker did not write {', '.join(missing) or 'its results'} "
                         f"(output_path {folder})"}
    return {"results": str(files["results"]), "samples": {t: str(p) for t, p in files["samples"].items()}}


def evaluate_tasks(
    model: Any, tokenizer: Any, tasks: list[ResolvedTask], data_dir: Path, *, prompting: Prompting = Prompting(),
    limit: int | None = None, batch_size: int = 1, bootstrap_iters: int = 0, output_dir: Path | None = None,
) -> TaskRun:
    """Run `tasks` (tasks or groups) on `model` through lm_eval.simple_evaluate. lm-eval's stderr
    bootstrap is off (bootstrap_iters=0): the stderr of a mean is computed from the per-item values
    with lm-eval's formula (results.py), and LAMBADA's perplexity bootstrap would cost more than the
    evaluation. lm-eval's default seeds are kept (they pick the few-shot examples, as on lm-eval's
    command line); the caller's random state is restored. `output_dir`: lm-eval's own results and
    samples files are written there through its EvaluationTracker."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    tracker = EvaluationTracker(output_path=str(output_dir / "results.json")) if output_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="quantlab-tasks-") as folder, quiet_lm_eval(), kept_random_state():
        manager = task_manager(tasks, data_dir, Path(folder))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=[t.name for t in tasks], num_fewshot=prompting.num_fewshot, limit=limit,
            task_manager=manager, log_samples=True, bootstrap_iters=bootstrap_iters, evaluation_tracker=tracker,
            apply_chat_template=prompting.apply_chat_template, fewshot_as_multiturn=prompting.fewshot_as_multiturn,
            system_instruction=prompting.system_instruction,
        )
        results = collect(out, [t.name for t in tasks], _group_weighting(manager, out.get("group_subtasks") or {}))
        samples = out.pop("samples")
        if tracker is not None:  # else a random name: simple_evaluate gets a model object, not model_args
            tracker.general_config_tracker.model_name = (out.get("config") or {}).get("model")
        files = write_lm_eval_files(tracker, out, samples, output_dir) if tracker is not None else None
    source = {t.name: t for t in tasks}
    for result in results.values():  # a group's subtasks come from where the group does
        task = source.get(result.name) or source.get(_top(result.name, results))
        if task is not None:
            result.metrics["source"] = task.source
            if task.caveat:
                result.metrics["caveat"] = task.caveat
    return TaskRun(results, time.perf_counter() - start, files)


def _top(name: str, results: dict[str, TaskResult]) -> str:
    """The outermost group above `name` (itself when it has none)."""
    while (parent := results[name].metrics.get("group")) is not None:
        name = parent
    return name
