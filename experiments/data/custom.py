"""Calibration text from anywhere: a local file (`calib=custom`) or a hub dataset (`calib=hf`).

Both give a list of documents that the built-in sampling rules then draw from (calibration.py),
and a *variant* string holding a content hash of exactly those documents, as sources.py gives
for the built-in texts. The variant of a file never holds its path: the same documents at another
path (or in another format) are the same calibration text, and share cache entries.

What a document is, per `calib.format` (by default from the file's suffix; a trailing `.gz` is
decompressed first):

- `text` (`.txt`, `.text`, `.md`): the blocks between blank lines (lines holding only
  whitespace), each stripped of surrounding whitespace; empty blocks are dropped. So a file
  written as documents joined with "\\n\\n" reads back as those documents (when each is stripped
  and holds no blank line).
- `lines` (only as `calib.format=lines`): one document per line, stripped; empty lines dropped.
- `jsonl` (`.jsonl`, `.ndjson`, `.json`): field `calib.field` of each JSON object, one per line
  (a `.json` file holding one array of objects is read too). Values are used as they are.
- `parquet` (`.parquet`): column `calib.field`, values as they are.
- a hub dataset: column `calib.field` of `datasets.load_dataset(id, config, split=, revision=)`.

A value is a string, or a list of chat messages ({"role": ..., "content": ...}), which only
`calib.chat_template=true` can turn into text (calibration.py).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hub
from .sources import ResolvedRows, content_hash

FORMATS = ("text", "lines", "jsonl", "parquet")
SUFFIX_FORMATS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet",
}
BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")  # after universal newlines: one or more blank lines
FIELD_FORMATS = ("jsonl", "parquet")  # the formats (and hub datasets) that read calib.field


class CalibrationTextError(ValueError):
    """A custom or hub calibration text cannot be used as configured; the message names the key
    (calib.path, calib.field, ...) and the fix."""


@dataclass(frozen=True)
class TextSource:
    """Where `calib=custom` or `calib=hf` reads its documents."""

    kind: str  # "custom": a local file; "hf": a hub dataset
    path: str | None = None  # custom: the file (absolute)
    format: str | None = None  # custom: one of FORMATS; None: from the suffix
    field: str = "text"  # jsonl, parquet, hf: the field (column) holding each document
    dataset: str | None = None  # hf: the dataset id (or a local folder load_dataset reads)
    config: str | None = None  # hf: the dataset's configuration name
    split: str = "train"  # hf: a split, or a slice of one ("train[:1000]")
    revision: str | None = None  # hf: a branch, tag or commit; None: the default branch

    def file_format(self) -> str:
        """The custom file's format: calib.format, else its suffix (under any .gz)."""
        if self.format is not None:
            if self.format not in FORMATS:
                raise CalibrationTextError(
                    f"calib.format={self.format!r} is not a format; choose one of: {', '.join(FORMATS)}"
                )
            return self.format
        assert self.path is not None
        suffixes = [s.lower() for s in Path(self.path).suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes.pop()
        suffix = suffixes[-1] if suffixes else ""
        if suffix not in SUFFIX_FORMATS:
            known = ", ".join(f"{s} ({f})" for s, f in SUFFIX_FORMATS.items())
            raise CalibrationTextError(
                f"calib.path={self.path}: cannot tell its format from the suffix {suffix or '(none)'!r}; "
                f"known suffixes: {known} (each may end in .gz), or say calib.format=one of {', '.join(FORMATS)}"
            )
        return SUFFIX_FORMATS[suffix]

    def describe(self) -> dict[str, Any]:
        """What the record shows of the source (not part of any cache key: it holds the path)."""
        if self.kind == "hf":
            return {"kind": "hf", "dataset": self.dataset, "config": self.config, "split": self.split,
                    "revision": self.revision, "field": self.field}
        file_format = self.file_format()
        return {"kind": "custom", "path": self.path, "format": file_format,
                "field": self.field if file_format in FIELD_FORMATS else None}


def _read_file_text(path: Path) -> str:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:  # universal newlines: \r\n reads as \n
        return handle.read()


def text_documents(text: str) -> list[str]:
    """The `text` format: blocks between blank lines, stripped, empty ones dropped."""
    return [block.strip() for block in BLANK_LINES.split(text) if block.strip()]


def line_documents(text: str) -> list[str]:
    """The `lines` format: one document per line, stripped, empty lines dropped."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def _json_objects(text: str, where: str) -> list[tuple[str, Any]]:
    """(position, object) of a JSON-lines file, or of a file holding one JSON array."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise CalibrationTextError(f"{where}: not valid JSON ({error})") from None
        return [(f"item {i}", item) for i, item in enumerate(items)]
    objects = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            objects.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise CalibrationTextError(
                f"{where}: line {number} is not valid JSON ({error.msg}); each line must be one JSON object"
            ) from None
    return objects


def _field_values(records: list[tuple[str, Any]], field: str, where: str) -> list[Any]:
    values = []
    for position, record in records:
        if not isinstance(record, dict):
            raise CalibrationTextError(
                f"{where}: {position} is a JSON {type(record).__name__}, not an object holding calib.field"
            )
        if field not in record:
            fields = ", ".join(map(repr, record)) or "none"
            raise CalibrationTextError(
                f"{where}: {position} has no field {field!r} (its fields: {fields}); "
                f"set calib.field to the one holding the text"
            )
        values.append(record[field])
    return values


def _parquet_values(path: Path, field: str, where: str) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CalibrationTextError(
            f"{where}: reading parquet needs pyarrow, which is not installed (pip install pyarrow), "
            "or convert the file to JSON lines"
        ) from None
    try:
        schema = pq.read_schema(path)
        if field not in schema.names:
            raise CalibrationTextError(
                f"{where}: has no column {field!r} (its columns: {', '.join(map(repr, schema.names)) or 'none'}); "
                "set calib.field to the one holding the text"
            )
        return pq.read_table(path, columns=[field]).column(field).to_pylist()
    except CalibrationTextError:
        raise
    except Exception as error:  # pyarrow's ArrowInvalid / OSError for a damaged or non-parquet file
        raise CalibrationTextError(
            f"{where}: cannot be read as parquet ({type(error).__name__}: {error}); a damaged file, or "
            "another format (say calib.format=...)"
        ) from None


def is_messages(value: Any) -> bool:
    """A chat conversation: a non-empty list of {"role": str, "content": str} objects."""
    return (
        isinstance(value, list) and bool(value)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
    )


def _check_values(values: list[Any], where: str, field: str) -> None:
    for index, value in enumerate(values):
        if not isinstance(value, str) and not is_messages(value):
            shown = "null" if value is None else type(value).__name__
            raise CalibrationTextError(
                f"{where}: row {index}: field {field!r} is {shown}, not text (a string) or chat messages "
                "(a list of {\"role\", \"content\"} objects); drop such rows or name another calib.field"
            )
    if not any(isinstance(v, list) or v.strip() for v in values):
        raise CalibrationTextError(f"{where}: holds no text ({len(values)} rows, all empty); use another file or field")


def read_file_documents(source: TextSource) -> list[Any]:
    """The documents of a `calib=custom` file (see the module docstring)."""
    assert source.path is not None
    path = Path(source.path)
    where = f"calib.path={source.path}"
    file_format = source.file_format()
    if not path.is_file():
        why = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CalibrationTextError(f"{where}: {why}; give the calibration text file (a relative path is from "
                                   "the current directory)")
    try:
        if file_format == "parquet":
            values = _parquet_values(path, source.field, where)
        else:
            text = _read_file_text(path)
            if file_format == "jsonl":
                values = _field_values(_json_objects(text, where), source.field, where)
            elif file_format == "lines":
                values = line_documents(text)
            else:
                values = text_documents(text)
    except UnicodeDecodeError as error:
        raise CalibrationTextError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (EOFError, zlib.error, OSError) as error:  # gzip.BadGzipFile is an OSError
        raise CalibrationTextError(
            f"{where}: cannot be read ({type(error).__name__}: {error}): a truncated or damaged file"
        ) from None
    if not values:
        raise CalibrationTextError(f"{where}: holds no text (an empty file?); give a file with calibration text")
    _check_values(values, where, source.field)
    return values


def read_hub_documents(source: TextSource) -> list[Any]:
    """The documents of a `calib=hf` dataset: column `field` of the split, through `datasets`."""
    where = f"calib.dataset={source.dataset}" + (f" calib.config={source.config}" if source.config else "")
    try:
        data = hub.load_calibration_dataset(source.dataset, source.config, source.split, source.revision)
    except ImportError as error:
        raise CalibrationTextError(f"{where}: calib=hf needs the `datasets` package ({error})") from None
    except Exception as error:  # unknown id, no network, offline and not in the local cache, bad split ...
        offline = hub.hub_offline_reason()
        hint = (f" ({offline}: only datasets already in the local datasets cache load; unset it, or save the "
                "text to a file and use calib=custom calib.path=FILE)") if offline else ""
        raise CalibrationTextError(
            f"{where} split {source.split!r}: loading failed: {type(error).__name__}: {error}{hint}"
        ) from None
    columns = list(getattr(data, "column_names", None) or [])
    if source.field not in columns:
        raise CalibrationTextError(
            f"{where}: has no column {source.field!r} (its columns: {', '.join(map(repr, columns)) or 'none'}); "
            "set calib.field to the one holding the text"
        )
    values = list(data[source.field])
    if not values:
        raise CalibrationTextError(f"{where} split {source.split!r}: has no rows")
    _check_values(values, where, source.field)
    return values


def documents_hash(documents: list[Any]) -> str:
    """content_hash of the documents (chat messages as canonical JSON): equal for equal documents."""
    return content_hash([d if isinstance(d, str) else json.dumps(d, sort_keys=True, ensure_ascii=False)
                         for d in documents])


def resolve_documents(source: TextSource) -> ResolvedRows:
    """The documents of `source` and their variant (origin without any path, and content hash)."""
    if source.kind == "hf":
        documents = read_hub_documents(source)
        revision = source.revision or "default"
        origin = f"hf:{source.dataset}@{revision}/{source.config or '-'}/{source.split}/{source.field}"
        return ResolvedRows(source.dataset or "hf", source.split, documents,
                            f"{origin}:rows_sha256={documents_hash(documents)}")
    documents = read_file_documents(source)
    # No path, format or field: the same documents from another file are the same text.
    return ResolvedRows("custom", "file", documents,
                        f"custom:docs={len(documents)}:rows_sha256={documents_hash(documents)}")
