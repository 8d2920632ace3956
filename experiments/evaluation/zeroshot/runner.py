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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.evaluation.statistics import mean_stderr

from .tasks import ResolvedTask, task_manager

ACCURACY_METRICS = ("acc", "acc_norm")


@dataclass
class TaskResult:
    """One task's numbers and the per-item outcomes they come from (aligned by doc_id)."""

    name: str
    metrics: dict[str, Any]  # acc, acc_norm, stderr, acc_norm_stderr, n, (perplexity), source, caveat
    items: dict[str, list] = field(default_factory=dict)  # doc_id, acc, acc_norm, loglik


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


def _items(samples: list[dict[str, Any]]) -> dict[str, list]:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    items: dict[str, list] = {"doc_id": [int(s["doc_id"]) for s in samples]}
    for metric in ACCURACY_METRICS:
        if samples and metric in samples[0]:
            items[metric] = [float(s[metric]) for s in samples]
    # the log-likelihood of each choice (or of the target, for LAMBADA): what acc is decided on
    items["loglik"] = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
    return items


def _task_metrics(task: ResolvedTask, lm_results: dict[str, Any], items: dict[str, list]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for metric in ACCURACY_METRICS:
        if metric in items:
            values = items[metric]
            metrics[metric] = sum(values) / len(values)
            metrics["stderr" if metric == "acc" else f"{metric}_stderr"] = mean_stderr(values)
    if "perplexity,none" in lm_results:  # LAMBADA: lm-eval's exp(-mean log-likelihood of the target)
        metrics["perplexity"] = float(lm_results["perplexity,none"])
    metrics["n"] = len(items["doc_id"])
    metrics["source"] = task.source
    if task.caveat:
        metrics["caveat"] = task.caveat
    return metrics


def evaluate_tasks(
    model: Any, tokenizer: Any, tasks: list[ResolvedTask], data_dir: Path, *, num_fewshot: int = 0,
    limit: int | None = None, batch_size: int = 1, bootstrap_iters: int = 0,
) -> tuple[dict[str, TaskResult], float]:
    """Run `tasks` on `model` through lm_eval.simple_evaluate; returns per-task results and the
    seconds taken. lm-eval's own stderr bootstrap is off (bootstrap_iters=0): accuracy stderrs
    are computed here from the per-item values with lm-eval's formula, and LAMBADA's perplexity
    bootstrap would cost more than the evaluation. lm-eval's default seeds are kept (they pick the
    few-shot examples, as on lm-eval's command line); the caller's random state is restored."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quantlab-tasks-") as folder, quiet_lm_eval(), kept_random_state():
        manager = task_manager(tasks, data_dir, Path(folder))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=[t.name for t in tasks], num_fewshot=num_fewshot, limit=limit,
            task_manager=manager, log_samples=True, bootstrap_iters=bootstrap_iters,
        )
    results = {}
    for task in tasks:
        items = _items(out["samples"][task.name])
        results[task.name] = TaskResult(task.name, _task_metrics(task, out["results"][task.name], items), items)
    return results, time.perf_counter() - start
