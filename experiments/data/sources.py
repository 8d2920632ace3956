"""Named datasets: raw rows of a split, from the local data directory first, else the HF hub.

Every row list comes with a *variant* string recorded next to each number computed from it:
where the text came from (local file, hub, built-in) and a hash of its content, so that a
changed or non-canonical text can never pass for the published one.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .local_files import LOCAL_FILES, read_local_rows
from .pydocs import pydocs_origin, pydocs_rows

DATASET_SPLITS: dict[str, tuple[str, ...]] = {
    "wikitext2": ("train", "validation", "test"),
    "ptb": ("train", "validation", "test"),
    "c4": ("train", "validation"),
    "pydocs": ("train", "test"),
    "pile": ("validation",),  # AWQ's calibration text; hub only
}
KNOWN_DATASETS = tuple(DATASET_SPLITS)

DATA_DIR_VARIABLE = "QUANTLAB_DATA_DIR"


def data_dir() -> Path:
    """$QUANTLAB_DATA_DIR when set (and not empty), else ./data under the current directory."""
    configured = os.environ.get(DATA_DIR_VARIABLE, "").strip()
    return Path(configured).expanduser() if configured else Path.cwd() / "data"


class DatasetNotFound(FileNotFoundError):
    """A dataset split is neither in the local data directory nor reachable on the hub.

    The message lists every local path tried and says how to provide the data.
    """

    def __init__(
        self,
        name: str,
        split: str,
        paths_tried: list[Path],
        hub_id: str | None,
        reason: str,
        wanted_relpath: str | None = None,
    ):
        self.name = name
        self.split = split
        self.paths_tried = list(paths_tried)
        self.hub_id = hub_id
        self.reason = reason
        lines = [f"dataset {name!r} split {split!r} not found.", "Local paths tried:"]
        lines += [f"  {path}" for path in self.paths_tried] or ["  (none: this dataset has no local file)"]
        lines.append(f"Hub {hub_id!r}: {reason}" if hub_id else reason)
        if wanted_relpath:
            if os.environ.get(DATA_DIR_VARIABLE, "").strip():
                where = f"${DATA_DIR_VARIABLE}/{wanted_relpath}"
            else:
                where = f"./data/{wanted_relpath} (or set ${DATA_DIR_VARIABLE} to a data folder)"
            how = f"To provide it, put the file {Path(wanted_relpath).name} at {where}"
            if hub_id and hub.hub_offline_reason():
                how += ", or unset HF_DATASETS_OFFLINE and HF_HUB_OFFLINE to load it from the hub"
            elif hub_id:
                how += ", or make the hub reachable"
            lines.append(how + ".")
        super().__init__("\n".join(lines))


class TextTooShort(ValueError):
    """A text gives fewer tokens than one window or calibration sample needs; the message says
    which text and which knob to lower. (The preflight catches most cases from the byte count
    before the model loads; this is the exact check, after tokenization.)"""


@dataclass(frozen=True)
class ResolvedRows:
    """The rows of one dataset split and the variant string that describes them."""

    name: str
    split: str
    rows: list[str]
    variant: str


def content_hash(rows: list[str]) -> str:
    # NUL never occurs in these texts, so the joined string identifies the row list exactly.
    return hashlib.sha256("\x00".join(rows).encode("utf-8")).hexdigest()[:12]


def _check_known(name: str, split: str) -> None:
    if name not in DATASET_SPLITS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    if split not in DATASET_SPLITS[name]:
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; its splits: {', '.join(DATASET_SPLITS[name])}"
        )


def resolve_rows(name: str, split: str) -> ResolvedRows:
    """Rows and variant of `name`/`split`: local data directory first, then the hub."""
    _check_known(name, split)
    if name == "pydocs":
        try:
            rows = pydocs_rows(split)
        except ImportError as exc:  # a Python build without pydoc_data
            raise DatasetNotFound(name, split, [], None, f"pydoc_data is not importable: {exc}") from exc
        return ResolvedRows(
            name,
            split,
            rows,
            f"pydocs:{split}:{pydocs_origin()}:pydoc_data.topics:rows_sha256={content_hash(rows)}",
        )

    root = data_dir().absolute()
    candidates = LOCAL_FILES.get((name, split), ())
    tried: list[Path] = []
    for candidate in candidates:
        path = root / candidate.relpath
        tried.append(path)
        if path.is_file():
            rows, selection = read_local_rows(name, split, path)
            if candidate.tag == "local-approx":
                warnings.warn(
                    f"{name}/{split}: using {path}, an approximate copy (not byte-identical to the "
                    "canonical file); its perplexities are not comparable with published ones",
                    stacklevel=3,
                )
            variant = (
                f"{name}:{split}:{candidate.tag}:{path.name}{selection}:rows_sha256={content_hash(rows)}"
            )
            return ResolvedRows(name, split, rows, variant)

    hub_id = hub.HUB_SOURCES[name].describe(split)
    offline = hub.hub_offline_reason()
    if offline:
        raise DatasetNotFound(
            name, split, tried, hub_id, f"not tried because {offline}",
            candidates[0].relpath if candidates else None,
        )
    try:
        rows = hub.load_hub_rows(name, split)
    except Exception as exc:  # missing `datasets`, no network, removed dataset script, ...
        reason = f"loading failed: {type(exc).__name__}: {exc}"
        raise DatasetNotFound(
            name, split, tried, hub_id, reason, candidates[0].relpath if candidates else None
        ) from exc
    return ResolvedRows(name, split, rows, f"hf:{hub_id}:{split}:rows_sha256={content_hash(rows)}")


def load_rows(name: str, split: str) -> list[str]:
    """Raw rows of a named dataset split (see `resolve_rows` for where they come from)."""
    return resolve_rows(name, split).rows


def dataset_variant(name: str, split: str) -> str:
    """Short description of the text behind `name`/`split`, recorded with every number,
    e.g. "wikitext2:test:local:wiki.test.raw:rows_sha256=…" or "hf:wikitext/wikitext-2-raw-v1:test:…"."""
    return resolve_rows(name, split).variant
