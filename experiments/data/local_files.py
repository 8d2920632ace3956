"""Where each named dataset split lives in a local data directory, and how its rows are read.

The layout is the one of the offline data folder (see its README.md): one sub-folder per
dataset holding the original files. Rows are built to equal the rows of the Hugging Face
dataset the GPTQ reference loads, so that the joins in `protocols.py` give the same text.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalFile:
    """One candidate file for a dataset split, tried in order; the first that exists wins."""

    relpath: str  # relative to the data directory
    # Recorded in the dataset variant so that numbers from a non-canonical copy are never
    # mistaken for published ones: "local" (byte-exact copy), "local-approx", "local-sample".
    tag: str


# Per (dataset, split): candidates in order of preference. A canonical file, when someone
# provides it, is preferred over an approximate stand-in.
LOCAL_FILES: dict[tuple[str, str], tuple[LocalFile, ...]] = {
    ("wikitext2", "test"): (LocalFile("wikitext2/wiki.test.raw", "local"),),
    ("wikitext2", "validation"): (
        LocalFile("wikitext2/wiki.valid.raw", "local"),
        # 3 bytes short of the canonical file (one character lost in the source copy).
        LocalFile("wikitext2/wiki.valid.approx.raw", "local-approx"),
    ),
    ("wikitext2", "train"): (
        LocalFile("wikitext2/wiki.train.raw", "local"),
        LocalFile("wikitext2/wiki.train.raw.gz", "local"),
    ),
    ("ptb", "train"): (
        LocalFile("ptb/ptb.train.txt.gz", "local"),
        LocalFile("ptb/ptb.train.txt", "local"),
    ),
    ("ptb", "validation"): (LocalFile("ptb/ptb.valid.txt", "local"),),
    ("ptb", "test"): (LocalFile("ptb/ptb.test.txt", "local"),),
    # Only a 2,000-document sample of C4 *validation* is available offline. It is neither the
    # GPTQ evaluation slice nor the GPTQ calibration shard, hence the tag.
    ("c4", "train"): (LocalFile("c4/c4_en_validation_sample_2k.json.gz", "local-sample"),),
    ("c4", "validation"): (LocalFile("c4/c4_en_validation_sample_2k.json.gz", "local-sample"),),
}


def _read_text(path: Path) -> str:
    # Text mode with universal newlines, as the HF loading scripts opened these files.
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _file_lines(text: str) -> list[str]:
    # Split like iterating over an open text file (only at "\n", line endings kept), which is
    # what the HF loaders did; str.splitlines would also split at \f, \x1c, \u2028, ...
    # (the shipped wikitext/ptb files contain none, so both agree there).
    return list(io.StringIO(text, newline="\n"))


def wikitext_rows(text: str) -> list[str]:
    """HF `wikitext-2-raw-v1` rows: each line with its "\\n", and "" for a blank line (" \\n")."""
    return [line if line.strip() else "" for line in _file_lines(text)]


def ptb_rows(text: str) -> list[str]:
    """HF `ptb_text_only` "sentence" rows: every line, stripped (the leading/trailing space goes)."""
    return [line.strip() for line in _file_lines(text)]


def jsonl_texts(text: str) -> list[str]:
    """The "text" field of each JSON line (the format of the C4 shards)."""
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]


def c4_sample_half(docs: list[str], split: str) -> tuple[list[str], slice]:
    """The half of the local C4 sample a split may use.

    Evaluation ("validation") takes the first half and calibration ("train") the second, so a
    model is never evaluated on text it was calibrated on. For the 2,000-document sample this
    is docs[0:1000] and docs[1000:2000].
    """
    middle = len(docs) // 2
    part = slice(0, middle) if split == "validation" else slice(middle, len(docs))
    return docs[part], part


def read_local_rows(name: str, split: str, path: Path) -> tuple[list[str], str]:
    """Rows of `name`/`split` from `path`, and a suffix describing any selection made
    (e.g. "[1000:2000]" for the C4 calibration half; "" when the whole file is used)."""
    text = _read_text(path)
    if name == "wikitext2":
        return wikitext_rows(text), ""
    if name == "ptb":
        return ptb_rows(text), ""
    if name == "c4":
        docs, part = c4_sample_half(jsonl_texts(text), split)
        return docs, f"[{part.start}:{part.stop}]"
    raise ValueError(f"no local reader for dataset {name!r}")
