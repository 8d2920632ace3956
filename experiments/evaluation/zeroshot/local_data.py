"""The local zero-shot files of the data directory, read into the fields the hub datasets have.

lm-eval's task definitions read fields such as PIQA's `label` or ARC's `choices.text`; the local
copies (see the data README) keep some of them elsewhere or in another shape: PIQA's labels sit in
a separate file, ARC nests the question stem and choices, BoolQ's labels are the strings "true" /
"false", WinoGrande carries an extra `qID`. Each reader returns rows exactly as the hub's loader
yields them, so lm-eval's own prompts, choices and metrics apply unchanged.

`load_local_dataset` is what the generated task YAMLs name as their `custom_dataset`.
"""

from __future__ import annotations

import bz2
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_piqa(data_dir: Path) -> list[dict[str, Any]]:
    docs = _jsonl(data_dir / "piqa/valid.jsonl")
    labels = _labels(data_dir / "piqa/valid-labels.lst")
    if len(docs) != len(labels):
        raise ValueError(f"piqa: {len(docs)} items but {len(labels)} labels")
    # baber/piqa (lm-eval's source): goal, sol1, sol2 and the index of the right solution as an int
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(docs, labels)]


def _read_arc(path: Path) -> list[dict[str, Any]]:
    rows = []
    for doc in _jsonl(path):
        choices = doc["question"]["choices"]
        # allenai/ai2_arc: the stem as `question`, choices as parallel text/label lists
        rows.append({
            "id": doc["id"], "question": doc["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": doc["answerKey"],
        })
    return rows


def read_arc_easy(data_dir: Path) -> list[dict[str, Any]]:
    return _read_arc(data_dir / "arc/ARC-Easy-Test.jsonl")


def read_arc_challenge(data_dir: Path) -> list[dict[str, Any]]:
    return _read_arc(data_dir / "arc/ARC-Challenge-Test.jsonl")


def read_winogrande(data_dir: Path) -> list[dict[str, Any]]:
    docs = _jsonl(data_dir / "winogrande/dev.jsonl")
    labels = _labels(data_dir / "winogrande/dev-labels.lst")
    if [d["answer"] for d in docs] != labels:
        raise ValueError("winogrande: dev.jsonl's answers disagree with dev-labels.lst")
    # allenai/winogrande winogrande_xl: the answer stays the string "1" or "2"
    return [{k: d[k] for k in ("sentence", "option1", "option2", "answer")} for d in docs]


def read_boolq(data_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for doc in _jsonl(data_dir / "boolq/superglue_boolq_val.jsonl"):
        label = doc["label"]
        if isinstance(label, str):  # the OpenCompass copy: "true"/"false"
            label = {"false": 0, "true": 1}[label.strip().lower()]
        # super_glue/boolq: label is a ClassLabel with names [False, True]
        rows.append({"question": doc["question"], "passage": doc["passage"], "idx": int(doc["idx"]),
                     "label": int(label)})
    return rows


def read_lambada_openai(data_dir: Path) -> list[dict[str, Any]]:
    return [{"text": d["text"]} for d in _jsonl(data_dir / "lambada/lambada_test.jsonl")]


def read_hellaswag_local(data_dir: Path) -> list[dict[str, Any]]:
    """The llama.cpp-format copy: 6 lines per item (context, gold label, four endings), already
    cleaned by its extractor; lm-eval's own `preprocess` is applied on top so that whatever
    brackets and double spaces it would remove are removed here too. The context joins ctx_a and
    ctx_b without capitalizing ctx_b, which lm-eval does: hence a task of its own name."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    with bz2.open(data_dir / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    rows = []
    for start in range(0, len(lines), 6):
        query, label, *endings = lines[start : start + 6]
        rows.append({"query": preprocess(query), "choices": [preprocess(e) for e in endings], "label": label.strip()})
    return rows


LocalReader = Callable[[Path], list[dict[str, Any]]]

READERS: dict[str, LocalReader] = {
    "piqa": read_piqa,
    "arc_easy": read_arc_easy,
    "arc_challenge": read_arc_challenge,
    "winogrande": read_winogrande,
    "boolq": read_boolq,
    "lambada_openai": read_lambada_openai,
    "hellaswag_local": read_hellaswag_local,
}


def files_hash(data_dir: Path, relpaths: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for relpath in relpaths:
        digest.update(relpath.encode() + b"\0" + (data_dir / relpath).read_bytes())
    return digest.hexdigest()[:12]


def load_local_dataset(quantlab_task: str, data_dir: str, split: str, expected_items: int, **_metadata: Any):
    """lm-eval's `custom_dataset` hook: {split: Dataset} of one local task. lm-eval also passes
    the task's metadata as keyword arguments, which this loader does not need."""
    import datasets

    rows = READERS[quantlab_task](Path(data_dir))
    if len(rows) != expected_items:
        raise ValueError(
            f"{quantlab_task}: the local files under {data_dir} hold {len(rows)} items, not the published "
            f"{expected_items}: a different or truncated copy"
        )
    return {split: datasets.Dataset.from_list(rows)}
