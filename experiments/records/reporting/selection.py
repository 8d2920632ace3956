"""Which rows a table or plot shows: finished runs only (unless asked), narrowed by `key=value` filters."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable
from typing import Any

import pandas as pd

from quantlab.experiments.records.reporting.records import ReportError, is_null

NULL_WORDS = {"", "none", "null"}  # `--filter calib_dataset=none` selects runs without calibration


def parse_filter(text: str) -> tuple[str, list[str]]:
    """`key=value` or `key=v1,v2` (any of the values)."""
    key, sep, values = text.partition("=")
    if not sep or not key.strip():
        raise ReportError(f"--filter {text!r}: expected key=value (e.g. method=gptq, bits=3,4, tags=paper)")
    return key.strip(), [v.strip() for v in values.split(",")]


def cell_matches(cell: Any, wanted: str, key: str) -> bool:
    if is_null(cell):
        return wanted.lower() in NULL_WORDS
    if key == "tags":  # a run's tags are stored joined by commas; a filter names one of them
        return wanted in str(cell).split(",")
    if isinstance(cell, numbers.Real) and not isinstance(cell, bool):  # numpy scalars included
        try:
            return float(cell) == float(wanted)  # bits=4 matches 4 and 4.0 alike
        except ValueError:
            return False
    return str(cell) == wanted


def apply_filter(frame: pd.DataFrame, text: str) -> pd.DataFrame:
    key, values = parse_filter(text)
    if key not in frame.columns:
        close = difflib.get_close_matches(key, list(frame.columns), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; columns: {', '.join(frame.columns)}"
        raise ReportError(f"--filter {text!r}: no column {key!r}{hint}")
    mask = frame[key].map(lambda cell: any(cell_matches(cell, v, key) for v in values))
    return frame[mask.astype(bool)]


def select(frame: pd.DataFrame, filters: Iterable[str] = (), include_failed: bool = False) -> pd.DataFrame:
    """The rows to report: `ok` runs (all runs with `include_failed`) that pass every filter."""
    if not include_failed:
        frame = frame[frame["status"].eq("ok")]
    for text in filters:
        frame = apply_filter(frame, text)
    return frame
