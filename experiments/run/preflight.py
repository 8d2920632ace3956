"""Every data file a run needs, resolved, read and checked before the model loads.

A 7B model takes minutes to load; a typo in a data path, an empty, truncated, non-UTF-8 or
malformed file, or a text too short for one window must cost a second and one message that
names the file and the fix (a `DataError`, which the CLI prints like a config error), not a
traceback after the load. The checks return the content fingerprints of what they read (each
text's variant, which holds its content hash; the task files' sha256): a run's resume key, so a
finished run is only reused for the very same data, wherever it lives.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zlib
from pathlib import Path
from typing import Any

from quantlab.experiments.data.calibration import (
    CALIBRATION_SOURCES,
    calibration_split,
    resolve_calibration_rows,
)
from quantlab.experiments.data.custom import CalibrationTextError
from quantlab.experiments.data.local_files import LOCAL_FILES
from quantlab.experiments.data.protocols import STREAM_TEXTS
from quantlab.experiments.data.sources import DatasetNotFound, data_dir, resolve_rows
from quantlab.experiments.run.checks import needs_calibration
from quantlab.methods.base import ConfigError

# Tokens never outnumber the text's UTF-8 bytes (byte-level BPE; byte fallback), plus the few
# special tokens a tokenizer adds: so a text of fewer bytes than this cannot fill a window.
SPECIAL_TOKENS_SLACK = 2


class DataError(ConfigError):
    """A data file a run needs is missing or unusable; the message names it and the fix."""


def _local_path(name: str, split: str) -> Path | None:
    root = data_dir().absolute()
    for candidate in LOCAL_FILES.get((name, split), ()):
        if (root / candidate.relpath).is_file():
            return root / candidate.relpath
    return None


# texts already read and checked in this process (a sweep checks every job, then each job again),
# by file identity: an edited or replaced file is read again
_READ: dict[tuple, Any] = {}


def _identity(path: Path | None) -> tuple:
    if path is None:
        return ()
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def read_text(what: str, name: str, split: str) -> Any:
    """resolve_rows with every failure turned into a DataError naming the file."""
    path = _local_path(name, split)
    key = (str(data_dir().absolute()), name, split, _identity(path))
    if key in _READ:
        return _READ[key]
    where = str(path) if path else f"{name}/{split}"
    fix = "replace it with a good copy (the shared data folder has one) or point paths.data_dir elsewhere"
    try:
        _READ[key] = resolve_rows(name, split)
        return _READ[key]
    except DatasetNotFound as error:
        raise DataError(f"{what}: {error}") from None
    except UnicodeDecodeError as error:
        raise DataError(
            f"{what}: {where} is not UTF-8 text ({error.reason} at byte {error.start}); {fix}"
        ) from None
    except (EOFError, zlib.error, OSError) as error:
        raise DataError(
            f"{what}: {where} cannot be read ({type(error).__name__}: {error}): a truncated or damaged "
            f"file; {fix}"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # json.JSONDecodeError is a ValueError
        raise DataError(
            f"{what}: {where} is malformed ({type(error).__name__}: {error}): each line must be a JSON "
            f"object with a 'text' field; {fix}"
        ) from None


def _check_length(
    what: str, resolved: Any, join: str | None, min_tokens: int, knob: str, where: Any = None
) -> None:
    """`where`: a custom or hub text (its path or id), whose rows are documents a join can pool."""
    rows = resolved.rows
    custom = where is not None
    where = where or _local_path(resolved.name, resolved.split) or f"{resolved.name}/{resolved.split}"
    if not any(row.strip() for row in rows):
        raise DataError(f"{what}: {where} holds no text (empty file?); replace it with a good copy")
    if join is None:  # documents are tokenized one by one: one of them must fill a window
        size, unit = max(len(row.encode("utf-8")) for row in rows), "its longest document has"
    else:
        size, unit = len(join.join(rows).encode("utf-8")), "it has"
    if size + SPECIAL_TOKENS_SLACK < min_tokens:
        raise DataError(
            f"{what}: {where} is too short for one window of {min_tokens} tokens ({unit} only {size} bytes, "
            f"{len(rows)} {'documents' if custom else 'rows'} in all); lower {knob} or use a longer text"
            + ("; or draw from the documents joined into one stream: calib.join=paragraph"
               if custom and join is None else "")
        )


def check_texts(run: Any) -> dict[str, str]:
    """The evaluation and calibration texts: {purpose: variant (origin and content hash)}."""
    fingerprints: dict[str, str] = {}
    seqlen = run.eval.ppl.seqlen
    for dataset in run.eval.ppl.datasets:
        what = f"eval.ppl.datasets: {dataset}"
        if dataset == "c4":  # 256 random windows, each inside one document of >= seqlen tokens
            resolved = read_text(what, "c4", "validation")
            _check_length(what, resolved, None, seqlen, "eval.ppl.seqlen")
        else:
            text = STREAM_TEXTS[dataset]
            resolved = read_text(what, text.source, text.split)
            _check_length(what, resolved, text.join, seqlen, "eval.ppl.seqlen")
        fingerprints[f"eval:{dataset}"] = resolved.variant
    if needs_calibration(run):
        fingerprints["calib"] = check_calibration_text(run.calib)
    return fingerprints


def _read_documents(what: str, spec: Any) -> Any:
    """A custom file's or hub dataset's documents (custom.py), its errors as DataErrors."""
    source = spec.source
    if source.kind == "custom":
        path = Path(source.path)
        key = ("custom", _identity(path) if path.is_file() else str(path), source.format, source.field,
               spec.chat_template)
    else:
        key = ("hf", source.dataset, source.config, source.split, source.revision, source.field, spec.chat_template)
    if key not in _READ:
        try:
            _READ[key] = resolve_calibration_rows(spec)
        except CalibrationTextError as error:
            raise DataError(f"{what}: {error}") from None
    return _READ[key]


def check_calibration_text(calib: Any) -> str:
    """The calibration text of a (typed) calib group, read and checked: its variant."""
    if calib.source == "builtin":
        source, join = CALIBRATION_SOURCES[calib.dataset]
        what = f"calib.dataset={calib.dataset}"
        resolved = read_text(what, source, calibration_split(calib.dataset))
        where = None
    else:
        spec = calib.spec()
        what = f"calib={calib.source}"
        resolved = _read_documents(what, spec)
        join, where = spec.join, spec.source.path or spec.source.dataset
        if spec.chat_template:  # the template adds text: only the draw can tell what is too short
            return resolved.variant
    if calib.sampling == "awq":  # lines concatenated, then cut into seqlen blocks
        _check_length(what, resolved, "", calib.seqlen, "calib.seqlen", where)
    else:  # a window start randint(0, n - seqlen - 1) needs more than seqlen tokens
        _check_length(what, resolved, join, calib.seqlen + 1, "calib.seqlen", where)
        wanted = calib.nsamples * calib.seqlen
        if where is not None and len((join or "").join(resolved.rows).encode()) < wanted:
            warnings.warn(
                f"{what}: {where} holds fewer than nsamples x seqlen = {wanted} tokens of text: the "
                "calibration windows overlap (text repeats across samples)", stacklevel=2,
            )
    return resolved.variant


def check_tasks(run: Any) -> dict[str, str]:
    """Each local zero-shot task's files, read as the run will read them: {task: sha256, include folder's
    sha256, or hub}."""
    if not run.eval.tasks:
        return {}
    from quantlab.experiments.evaluation.zeroshot.local_data import READERS
    from quantlab.experiments.evaluation.zeroshot.stage import plan_tasks
    from quantlab.experiments.evaluation.zeroshot.tasks import LOCAL_TASKS

    fingerprints = {}
    root = data_dir().absolute()
    for task in plan_tasks(run.eval):
        if task.source != "local":  # a folder of your own YAMLs (hashed when resolved), or the hub
            fingerprints[f"task:{task.name}"] = (
                f"include:{task.protocol['files_sha256']}" if task.source == "include" else "hub"
            )
            continue
        spec = LOCAL_TASKS[task.name]
        files = ", ".join(str(root / f) for f in spec.files)
        key = (str(root), task.name, *(_identity(root / f) for f in spec.files))
        fingerprints[f"task:{task.name}"] = f"local:{task.protocol.get('files_sha256')}"
        if key in _READ:
            continue
        try:
            rows = READERS[task.name](root)
        except UnicodeDecodeError as error:
            raise DataError(f"eval.tasks: {task.name}: {files}: not UTF-8 text ({error.reason})") from None
        except (EOFError, zlib.error, OSError) as error:
            raise DataError(
                f"eval.tasks: {task.name}: {files} cannot be read ({type(error).__name__}: {error}): "
                "a truncated or damaged file; replace it with a good copy"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise DataError(
                f"eval.tasks: {task.name}: {files} is malformed ({type(error).__name__}: {error}); "
                "replace it with a good copy"
            ) from None
        if len(rows) != spec.items:
            raise DataError(
                f"eval.tasks: {task.name}: {files} hold {len(rows)} items, not the published {spec.items}: "
                "a different or truncated copy; replace it with a good copy"
            )
        _READ[key] = True
    return fingerprints


def check_data(run: Any) -> dict[str, str]:
    """Every text and task file the run needs; {purpose: content fingerprint}. Call it with the
    run's data directory in effect (quantlab.experiments.run.flow.data_dir_from_config)."""
    fingerprints = {**check_texts(run), **check_tasks(run)}
    if getattr(run, "allocation", None) is not None:  # the widths come from this file's content
        fingerprints["allocation_sensitivity"] = hashlib.sha256(Path(run.allocation.source).read_bytes()).hexdigest()
    return fingerprints


def data_fingerprint(fingerprints: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:16]
