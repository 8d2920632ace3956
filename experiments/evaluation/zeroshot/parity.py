"""The reference a local task definition is checked against: lm-eval's built-in YAML of the task
with only its data source replaced by JSON lines in the hub dataset's fields, converted from the
same local files by code written apart from local_data.py (tests and the parity script)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tasks import LM_EVAL_TASKS_DIR, LOCAL_TASKS

REPRODUCED = ("piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "lambada_openai")


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hub_rows(task: str, data: Path) -> list[dict]:
    if task == "piqa":
        labels = (data / "piqa/valid-labels.lst").read_text().split()
        return [dict(d, label=int(y)) for d, y in zip(_lines(data / "piqa/valid.jsonl"), labels)]
    if task.startswith("arc_"):
        name = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}[task]
        return [
            {"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]}}
            for d in _lines(data / f"arc/{name}-Test.jsonl")
        ]
    if task == "winogrande":
        keys = ("sentence", "option1", "option2", "answer")
        return [{k: d[k] for k in keys} for d in _lines(data / "winogrande/dev.jsonl")]
    if task == "boolq":
        return [dict(d, label=1 if d["label"] == "true" else 0) for d in _lines(data / "boolq/superglue_boolq_val.jsonl")]
    if task == "lambada_openai":
        return _lines(data / "lambada/lambada_test.jsonl")
    raise KeyError(task)


def reference_config(task: str, data: Path, folder: Path) -> dict[str, Any]:
    """lm-eval's built-in definition of `task`, its data source pointed at hub-field JSON lines."""
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = LOCAL_TASKS[task]
    path = folder / f"{task}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in hub_rows(task, data)))
    config = load_yaml(LM_EVAL_TASKS_DIR / spec.builtin_yaml, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {spec.split: str(path)}},
                  training_split=None, validation_split=None, test_split=None)
    config[f"{spec.split}_split"] = spec.split
    return config


def compare_on_model(model: Any, tokenizer: Any, data: Path, folder: Path, limit: int, batch_size: int = 1) -> dict:
    """Per task: do our local definition and the reference give identical per-item results
    (doc ids, acc, acc_norm, every choice's log-likelihood) on the first `limit` items?"""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .results import per_item
    from .runner import evaluate_tasks, quiet_lm_eval
    from .tasks import resolve_tasks

    ours = evaluate_tasks(model, tokenizer, resolve_tasks(list(REPRODUCED), data, "local"), data, limit=limit,
                          batch_size=batch_size).results
    with quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        theirs = simple_evaluate(
            model=lm, tasks=[reference_config(t, data, folder) for t in REPRODUCED], limit=limit, log_samples=True,
            bootstrap_iters=0, task_manager=TaskManager(include_defaults=False),
        )
    out = {}
    for task in REPRODUCED:
        reference = per_item(theirs["samples"][task], theirs["configs"][task]["output_type"])
        # ours keeps the per-item metrics whose mean is the task's number, and the log-likelihoods
        identical = all(values == reference.get(key) for key, values in ours[task].items.items())
        out[task] = {"identical": identical and "acc" in ours[task].items, "n": len(reference["doc_id"]),
                     "acc": ours[task].metrics["acc"], "reference_acc": theirs["results"][task]["acc,none"]}
    return out
