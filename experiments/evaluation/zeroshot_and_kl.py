"""How close a quantized model stays to its full-precision baseline beyond perplexity: zero-shot
task accuracy paired with the baseline's on the same items (experiments/evaluation/zeroshot) and KL
to the baseline's token distributions over the perplexity windows (experiments/evaluation/kl.py).

experiments/run/flow.py calls four things: `plan` before the model loads (bad task names or
missing data fail in a second), `check_prompting` once the tokenizer is there, `compute_baseline`
next to the baseline perplexity (everything cached), and, per quantized model, `kl_observer` inside
its perplexity pass and `evaluate` after it (lm-eval's own files go to lm_eval/<model label>/).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantlab.experiments.evaluation.kl import KLAccumulator, TopKSummary, baseline_summary, kl_windows
from quantlab.experiments.evaluation.zeroshot.stage import (
    baseline_as_quantized,
    baseline_tasks,
    check_tokenizer,
    plan_tasks,
    quantized_tasks,
    task_protocol,
)
from quantlab.experiments.evaluation.zeroshot.tasks import ResolvedTask
from quantlab.experiments.store.cache import Cache, atomic_write_json

ITEMS_FILE = "zeroshot_items.json"
LM_EVAL_DIR = "lm_eval"  # lm-eval's own results_*.json and samples_<task>_*.jsonl, one folder per model


@dataclass
class Baseline:
    tasks: list[ResolvedTask] = field(default_factory=list)
    task_results: dict[str, dict] = field(default_factory=dict)  # {task or group: {"metrics", "items"}}
    kl: dict[str, TopKSummary] = field(default_factory=dict)  # {dataset: summary}


def plan(run: Any) -> list[ResolvedTask]:
    return plan_tasks(run.eval)


def check_prompting(tokenizer: Any, run: Any) -> None:
    """eval.apply_chat_template against the loaded tokenizer, before any baseline is computed."""
    check_tokenizer(tokenizer, run.eval)


def compute_baseline(loaded: Any, run: Any, sets: dict[str, Any], tasks: list[ResolvedTask], record: Any) -> Baseline:
    """The baseline's per-item task outcomes and KL summaries (from the cache when there), recorded
    under baseline.tasks, eval_protocol.tasks / eval_protocol.kl and timings."""
    evaluation = run.eval
    baseline = Baseline(tasks=tasks)
    timings = record.data["timings"]
    if tasks:
        record.data["eval_protocol"]["tasks"] = {t.name: task_protocol(t, evaluation) for t in tasks}
        baseline.task_results, seconds, files = baseline_tasks(
            loaded, evaluation, tasks, run.paths.cache_path, lm_eval_folder(record.run_dir, "baseline")
        )
        record.data["baseline"]["tasks"] = {name: entry["metrics"] for name, entry in baseline.task_results.items()}
        if files:  # only what was computed in this run: a cached baseline's files are in the run that computed it
            record.data["baseline"]["lm_eval_files"] = {name: relative_files(f, record.run_dir) for name, f in files.items()}
        timings["baseline_tasks_s"] = seconds
    kl_protocol = {}
    cache = Cache("baseline_kl", root=run.paths.cache_path)
    spent = 0.0
    for dataset, windows in sets.items():
        n = kl_windows(evaluation.kl, dataset, windows.input_ids.shape[0])
        if n == 0:
            continue
        key = {
            "model": loaded.fingerprint, "dtype": str(next(loaded.model.parameters()).dtype),
            "device": loaded.device.type, "protocol": windows.protocol,
        }
        baseline.kl[dataset], seconds = baseline_summary(
            loaded.model, loaded.architecture, windows.input_ids, evaluation.ppl.batch_size, evaluation.kl.top_k,
            evaluation.kl.tail_samples, n, cache, key,
        )
        spent += seconds
        summary = baseline.kl[dataset]
        kl_protocol[dataset] = {"n_windows": n, "top_k": summary.top_k, "tail_samples": summary.tail_samples,
                                "estimator": summary.estimator}
    if kl_protocol:
        record.data["eval_protocol"]["kl"] = kl_protocol
        timings["baseline_kl_s"] = spent
    return baseline


def kl_observer(baseline: Baseline, dataset: str) -> KLAccumulator | None:
    summary = baseline.kl.get(dataset)
    return KLAccumulator(summary) if summary is not None else None


def identical_kl(baseline: Baseline, dataset: str) -> dict | None:
    """KL of a method that changes no weight: the baseline against itself, exactly 0."""
    summary = baseline.kl.get(dataset)
    if summary is None:
        return None
    n, positions = summary.n_windows, summary.top_ids.shape[1]
    return {
        "mean_kl": 0.0, "ci_low": 0.0, "ci_high": 0.0, "top1_agreement": 1.0, "n_windows": n,
        "n_positions": n * positions, "estimator": summary.estimator, "top_k": summary.top_k,
        "tail_samples": summary.tail_samples, "window_kl": [0.0] * n,
    }


def lm_eval_folder(run_dir: Path, label: str) -> Path:
    """Where lm-eval's own results and samples files of one evaluated model go: lm_eval/<label>."""
    return Path(run_dir) / LM_EVAL_DIR / re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def relative_files(files: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """lm-eval's file paths relative to the run folder (run folders move), or the error as it is."""
    if "error" in files:
        return files
    rel = lambda path: str(Path(path).relative_to(Path(run_dir)))  # noqa: E731
    return {"results": rel(files["results"]), "samples": {task: rel(p) for task, p in files["samples"].items()}}


def evaluate(
    model: Any, tokenizer: Any, run: Any, baseline: Baseline, changes_weights: bool, run_dir: Path | None = None,
    label: str = "model",
) -> dict[str, Any]:
    """metrics.tasks and metrics.delta of the model as it is now, its per-item outcomes (under
    "items", for the caller to write beside result.json), the seconds spent, and with `run_dir`
    lm-eval's own files of this evaluation (paths relative to it). A method that changes no weight
    reuses the baseline's numbers: no evaluation, no files."""
    if not baseline.tasks:
        return {}
    start = time.perf_counter()
    if changes_weights:
        folder = lm_eval_folder(run_dir, label) if run_dir is not None else None
        out = quantized_tasks(model, tokenizer, run.eval, baseline.tasks, baseline.task_results, folder)
        files = out.pop("lm_eval_files")
        if files is not None and run_dir is not None:
            out["lm_eval_files"] = relative_files(files, run_dir)
    else:
        tasks, deltas, items = baseline_as_quantized(baseline.task_results)
        out = {"tasks": tasks, "delta": deltas, "items": items}
    return {**out, "seconds": time.perf_counter() - start}


def write_items(run_dir: Path, label: str, items: dict[str, dict]) -> None:
    """Per-item outcomes of every evaluated model of the run, {label: {task: items}}, beside
    result.json (lm-eval's log_samples, reduced to what the paired statistics need)."""
    path = Path(run_dir) / ITEMS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[label] = items
    atomic_write_json(path, data)
