"""Which lm-eval task definition each `eval.tasks` name runs: the user's own (a task, group or
tag of the `eval.include_path` folder), lm-eval's own (data from the hub) or a local one (data from
the data directory), and the TaskManager that indexes only those.

A local definition is written at run time as a YAML that *includes* lm-eval's own YAML of the
same task (by absolute path) and overrides only the data source and the splits. The prompts,
choices, targets and metrics therefore are lm-eval's, for whichever lm-eval version is installed,
and a number offline equals the number online on the same items. Data paths in the YAML are
absolute: lm-eval resolves relative `data_files` against the working directory, not the YAML.

HellaSwag is the exception: the local copy cannot reproduce lm-eval's prompt (see local_data),
so it is offered only as `hellaswag_local`, with a caveat recorded next to its number.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval

from quantlab.experiments.data.hub import hub_offline_reason
from quantlab.methods.base import ConfigError

from .local_data import files_hash

log = logging.getLogger(__name__)

LM_EVAL_TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
TASK_SOURCES = ("auto", "local", "hub")  # and "include": a task of eval.include_path
HELLASWAG_CAVEAT = (
    "hellaswag_local: the local HellaSwag copy joins ctx_a and ctx_b without capitalizing ctx_b and was "
    "cleaned by another extractor, so its accuracy can differ slightly from lm-eval's `hellaswag`"
)


@dataclass(frozen=True)
class LocalTask:
    builtin_yaml: str  # lm-eval's definition, relative to lm_eval/tasks
    split: str  # the split lm-eval evaluates (test if the task has one, else validation)
    files: tuple[str, ...]  # under the data directory
    items: int  # published size of that split


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/piqa.yaml", "validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), 1838),
    "arc_easy": LocalTask("arc/arc_easy.yaml", "test", ("arc/ARC-Easy-Test.jsonl",), 2376),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", "test", ("arc/ARC-Challenge-Test.jsonl",), 1172),
    "winogrande": LocalTask(
        "winogrande/default.yaml", "validation", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), 1267
    ),
    "boolq": LocalTask("super_glue/boolq/default.yaml", "validation", ("boolq/superglue_boolq_val.jsonl",), 3270),
    "lambada_openai": LocalTask("lambada/lambada_openai.yaml", "test", ("lambada/lambada_test.jsonl",), 5153),
    "hellaswag_local": LocalTask(
        "hellaswag/hellaswag.yaml", "validation", ("hellaswag/hellaswag_val_full.txt.bz2",), 10042
    ),
}
# lm-eval folders that define the standard names, so a hub run indexes a few YAMLs, not thousands
BUILTIN_DIRS = {
    "piqa": "piqa", "arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag",
    "winogrande": "winogrande", "boolq": "super_glue/boolq", "lambada_openai": "lambada",
}
PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada_openai")


@dataclass(frozen=True)
class ResolvedTask:
    name: str
    source: str  # "include", "local" or "hub"
    protocol: dict[str, Any]  # recorded with the number and part of the baseline's cache key
    caveat: str | None = None


def _local_protocol(name: str, data_dir: Path) -> dict[str, Any]:
    spec = LOCAL_TASKS[name]
    return {
        "task": name, "source": "local", "definition": f"lm_eval/tasks/{spec.builtin_yaml} with local data",
        "split": spec.split, "files": list(spec.files), "files_sha256": files_hash(data_dir, spec.files),
        "n_items_total": spec.items, "lm_eval": lm_eval_version(),
    }


def lm_eval_version() -> str:
    from importlib import metadata

    return metadata.version("lm-eval")


def resolve_tasks(
    names: list[str], data_dir: Path, source: str = "auto", include_path: str | None = None
) -> list[ResolvedTask]:
    """Decide include, local or hub for each task name (a name the `include_path` folder defines
    runs from there), and fail early (before any model loads) when the
    data a task needs is not there. `auto`: local when the task's files are in the data directory
    (a machine without network need not say HF_DATASETS_OFFLINE=1) or the hub is off
    (HF_*_OFFLINE), else the hub. The record says which source each task used."""
    if source not in TASK_SOURCES:
        raise ConfigError(f"eval.task_source={source!r} is not valid; choose one of: {', '.join(TASK_SOURCES)}")
    offline = hub_offline_reason()
    included = included_tasks(include_path) if include_path else {}
    resolved = []
    for name in names:
        if name in included:
            resolved.append(ResolvedTask(name, "include", included[name]))
            continue
        local_ok = name in LOCAL_TASKS and all((data_dir / f).is_file() for f in LOCAL_TASKS[name].files)
        use_local = name == "hellaswag_local" or source == "local" or (source == "auto" and (offline is not None or local_ok))
        if use_local and name == "hellaswag":
            # the local copy cannot reproduce lm-eval's `hellaswag`: it runs under its own name,
            # and the record says so (eval=paper names `hellaswag` and works offline too)
            log.warning("eval.tasks: 'hellaswag' runs from local files as 'hellaswag_local'. %s", HELLASWAG_CAVEAT)
            name = "hellaswag_local"
            if name in names:
                continue
            local_ok = all((data_dir / f).is_file() for f in LOCAL_TASKS[name].files)
        if use_local:
            if name not in LOCAL_TASKS:
                why = f"the hub is off ({offline})" if offline else "eval.task_source=local"
                raise ConfigError(
                    f"eval.tasks: {name!r} has no local definition and {why}; local tasks: "
                    f"{', '.join(LOCAL_TASKS)}"
                )
            if not local_ok:
                missing = [str(data_dir / f) for f in LOCAL_TASKS[name].files if not (data_dir / f).is_file()]
                raise ConfigError(
                    f"eval.tasks: {name!r} needs {', '.join(missing)}; set paths.data_dir (QUANTLAB_DATA_DIR) to "
                    "the data folder" + (", or unset HF_DATASETS_OFFLINE/HF_HUB_OFFLINE" if offline else "")
                )
            caveat = HELLASWAG_CAVEAT if name == "hellaswag_local" else None
            resolved.append(ResolvedTask(name, "local", _local_protocol(name, data_dir), caveat))
        else:
            resolved.append(ResolvedTask(name, "hub", {"task": name, "source": "hub", "lm_eval": lm_eval_version()}))
    return resolved


def included_tasks(include_path: str) -> dict[str, dict[str, Any]]:
    """{name: protocol} of every task, group and tag that the YAMLs under `include_path` (lm-eval's
    --include_path: a folder of task YAMLs, e.g. over local JSON lines) define. The protocol's hash
    covers every file in the folder, YAMLs and data, so editing either invalidates cached baselines."""
    from lm_eval.tasks import TaskManager

    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"eval.include_path={include_path!r} is not a folder; point it at a folder of lm-eval task YAMLs")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    manager = TaskManager(include_path=str(folder.absolute()), include_defaults=False)
    kinds = {name: "group" for name in manager.all_groups} | {name: "tag" for name in manager.all_tags}
    return {
        name: {"task": name, "source": "include", "kind": kinds.get(name, "task"), "include_path": str(folder.absolute()),
               "files_sha256": digest.hexdigest()[:12], "lm_eval": lm_eval_version()}
        for name in manager.all_tasks
    }


def write_local_yaml(name: str, data_dir: Path, folder: Path) -> Path:
    """One task YAML: lm-eval's definition included by absolute path, the data source replaced."""
    spec = LOCAL_TASKS[name]
    splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    splits[f"{spec.split}_split"] = spec.split
    config: dict[str, Any] = {
        "include": str(LM_EVAL_TASKS_DIR / spec.builtin_yaml),
        "task": name,
        "dataset_path": str(data_dir / spec.files[0]),  # only recorded: custom_dataset does the loading
        "dataset_name": None,
        "dataset_kwargs": {"quantlab_task": name, "data_dir": str(data_dir.absolute()), "split": spec.split,
                           "expected_items": spec.items},
        **splits,
    }
    if name == "hellaswag_local":
        config["process_docs"] = None  # the reader already built query/choices; lm-eval's needs ctx_a/ctx_b
    lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]
    # lm-eval's `!function` tag resolves an importable module when no file sits beside the YAML
    lines.append("custom_dataset: !function quantlab.experiments.evaluation.zeroshot.local_data.load_local_dataset")
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def task_manager(tasks: list[ResolvedTask], data_dir: Path, folder: Path):
    """A TaskManager that indexes only what `tasks` needs: the local YAMLs (written into
    `folder`) and the lm-eval folders of hub tasks; the full index of lm-eval's thousands of
    YAMLs (seconds per run) only for a hub task quantlab does not know."""
    from lm_eval.tasks import TaskManager

    paths: list[str] = []
    index_everything = False
    for task in tasks:
        if task.source == "include":
            paths.append(task.protocol["include_path"])
        elif task.source == "hub":
            if task.name in BUILTIN_DIRS:
                paths.append(str(LM_EVAL_TASKS_DIR / BUILTIN_DIRS[task.name]))
            else:
                index_everything = True
    if any(t.source == "local" for t in tasks):
        folder.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            if task.source == "local":
                write_local_yaml(task.name, data_dir, folder)
        paths.append(str(folder))  # last: a local name wins over a built-in one of the same folder
    paths = list(dict.fromkeys(paths))
    return TaskManager(include_path=paths or None, include_defaults=index_everything)

