"""Run records as a table: find `result.json` files and flatten them, one row per (run, method entry).

A run's main method is entry 0 and each `comparisons` entry (a method run beside it on the same
evaluation windows) is entry 1, 2, ...; each becomes its own row, so that a sweep and its
comparisons land in one table. Per-dataset figures become columns named `<metric>_<dataset>`:

    ppl_<ds>, ppl_<ds>_ci_low, ppl_<ds>_ci_high, ppl_<ds>_n_windows     the entry's perplexity
    ppl_<ds>_seqlen, ppl_<ds>_n_windows_total                           the evaluation protocol
    ppl_ratio_<ds>, ppl_ratio_<ds>_ci_low, ppl_ratio_<ds>_ci_high       paired ratio to the baseline
    baseline_ppl_<ds>, baseline_ppl_<ds>_ci_low, baseline_ppl_<ds>_ci_high
    expected_ppl_<ds>, rel_diff_ppl_<ds>                                published value (paper configs)
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from quantlab.experiments.records.record import RESULT_FILE, replicate_hash

FP16 = "fp16"  # the method that quantizes nothing: its rows sit at 16 bits per weight

# Columns every frame has, in this order; per-dataset columns follow.
RUN_COLUMNS = [
    "run_dir", "record_path", "entry_index", "status", "error", "name", "model", "method", "method_options", "bits",
    "group_size",
    "avg_bits", "act_bits", "act", "kv_bits", "kv", "model_bytes", "fp16_model_bytes", "calib_dataset", "calib_nsamples", "calib_seqlen",
    "calib_seed", "seed", "config_hash", "replicate_of", "tags", "expected_source", "quantize_s", "eval_s", "started_at",
    "finished_at",
]
# Integer fields, kept integral (nullable) so that a missing value does not turn 4 into 4.0.
INTEGER_COLUMNS = ["entry_index", "bits", "group_size", "act_bits", "model_bytes", "fp16_model_bytes", "calib_nsamples",
                   "calib_seqlen", "calib_seed", "seed"]
# Identifies "the same method entry of the same configuration" across run directories.
DUPLICATE_KEY = ["config_hash", "entry_index", "method", "bits", "group_size"]


class ReportError(ValueError):
    """A report cannot be made as asked (nothing found, an unknown column, ...): the message says why."""


def warn(message: str) -> None:
    print(f"quantlab-report: {message}", file=sys.stderr)


def is_null(value: Any) -> bool:
    """None, NaN and pd.NA alike: the three ways a missing field shows up in a frame."""
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def find_result_files(paths: Iterable[Path | str]) -> list[Path]:
    """Every result.json under the given directories; a file given by name is taken as is."""
    found: dict[Path, None] = {}  # ordered set: overlapping roots must not read a file twice
    for path in map(Path, paths):
        if path.is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            found.update(dict.fromkeys(p.resolve() for p in sorted(path.rglob(RESULT_FILE))))
        else:
            warn(f"no such file or directory: {path}")
    return list(found)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record in `path`, or None (with a warning naming the file) when it cannot be used."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        warn(f"skipping unreadable {path}: {error}")
        return None
    if not isinstance(record, dict):
        warn(f"skipping {path}: not a run record (a JSON {type(record).__name__})")
        return None
    return record


def method_entries(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The main method's fields as an entry shaped like a comparison, followed by the comparisons."""
    keys = ("method", "bits", "group_size", "avg_bits", "act_bits", "act", "kv_bits", "kv", "model_bytes", "metrics",
            "timings", "layers", "fine_tune")
    main = {k: record.get(k) for k in keys}
    main["config"] = (record.get("config") or {}).get("method") or {}
    return [main, *(record.get("comparisons") or [])]


def method_options(method: str | None, config: dict[str, Any]) -> str:
    """The method's knobs that differ from its registered defaults ("zero_in_range=True"), so two
    variants of one method (the literature's two RTNs, GPTQ with act-order) never share a cell."""
    if not config:
        return ""
    try:
        from quantlab.methods import get_method_class

        defaults = get_method_class(str(method)).config_class()
        default_of = {name: getattr(defaults, name) for name in type(defaults).field_names()}
    except ValueError:  # a method this code does not know: show every knob
        default_of = {}
    changed = [
        f"{key}={value}" for key, value in sorted(config.items())
        if key not in ("name", "bits", "group_size") and (key not in default_of or default_of[key] != value)
    ]
    return ",".join(changed)


def _interval_from_nll_delta(vs_baseline: dict[str, Any]) -> tuple[float | None, float | None]:
    # vs_baseline holds the interval of the mean NLL difference; exp maps it onto the PPL ratio.
    low, high = vs_baseline.get("ci_low"), vs_baseline.get("ci_high")
    return (math.exp(low) if low is not None else None, math.exp(high) if high is not None else None)


def calib_label(calib: dict[str, Any]) -> str | None:
    """The calibration text's name; a custom file's or hub dataset's (calib.source) with its
    content hash, so runs calibrated on different documents never pair as one protocol."""
    if not calib.get("source"):
        return calib.get("dataset")
    return f"{calib.get('dataset')}:{str(calib.get('variant', '')).rsplit('=', 1)[-1]}"


def act_label(act: dict[str, Any] | None) -> str | None:
    """The activation setting in a few words ("per_token sym dynamic", "per_tensor sym static
    percentile"); None when activations stay in full precision."""
    if not act or act.get("bits", 16) == 16:
        return None
    words = [act["granularity"], "sym" if act["sym"] else "asym", act["mode"]]
    if act.get("observer"):
        words.append(act["observer"]["name"])
    return " ".join(words)


def kv_label(kv: dict[str, Any] | None) -> str | None:
    """The KV-cache setting in a few words ("int4 per_token asym g-1 chunk128"); None when off."""
    if not kv or not kv.get("enabled"):
        return None
    words = [f"int{kv['bits']}", kv["granularity"], "sym" if kv["sym"] else "asym", f"g{kv['group_size']}"]
    if kv.get("residual"):
        words.append(f"residual{kv['residual']}")
    return " ".join([*words, f"chunk{kv['chunk']}"])


def entry_row(record_path: Path, record: dict[str, Any], index: int, entry: dict[str, Any]) -> dict[str, Any]:
    model = record.get("model") or {}
    calib = record.get("calib") or {}
    timings = entry.get("timings") or {}
    bits, group_size = entry.get("bits"), entry.get("group_size")
    if entry.get("method") == FP16:
        # fp16 keeps whatever top-level bits/group_size the config had; neither applies to it.
        bits, group_size = 16, None
    row: dict[str, Any] = {
        "run_dir": str(record_path.parent), "record_path": str(record_path), "entry_index": index,
        "status": record.get("status"), "error": record.get("error"), "name": record.get("name"),
        "model": model.get("name"), "method": entry.get("method"),
        "method_options": method_options(entry.get("method"), entry.get("config") or {}),
        "bits": bits, "group_size": group_size,
        "avg_bits": entry.get("avg_bits"), "model_bytes": entry.get("model_bytes"),
        # activation quantization (records before it existed: 16, off); `act` names the rest of it
        "act_bits": entry.get("act_bits", 16), "act": act_label(entry.get("act")),
        # KV-cache quantization (records before it existed: 16, off): measured bits per cached number
        "kv_bits": entry.get("kv_bits", 16.0), "kv": kv_label(entry.get("kv")),
        "fp16_model_bytes": record.get("fp16_model_bytes"),
        # The run's calibration set; null for runs whose methods need none (RTN).
        "calib_dataset": calib_label(calib), "calib_nsamples": calib.get("nsamples"),
        "calib_seqlen": calib.get("seqlen"), "calib_seed": calib.get("seed"),
        "seed": record.get("seed"), "config_hash": record.get("config_hash"),
        # the same experiment up to its seeds: replicates share it (experiments/records/reporting/replicates.py)
        "replicate_of": replicate_hash(record["config"]) if isinstance(record.get("config"), dict) else None,
        "tags": ",".join(map(str, record.get("tags") or [])),
        "expected_source": None, "quantize_s": timings.get("quantize_s"), "eval_s": timings.get("eval_s"),
        "started_at": record.get("started_at"), "finished_at": record.get("finished_at"),
    }
    if index == 0 and record.get("allocation"):  # widths chosen to a budget: not a uniform run at `bits`
        plan = record["allocation"]
        allocated = f"allocation={plan['target_bits']}:{plan['damage']}:{plan.get('solver', 'greedy')}"
        row["method_options"] = ",".join(filter(None, [row["method_options"], allocated]))
    for dataset, ppl in ((entry.get("metrics") or {}).get("ppl") or {}).items():
        row[f"ppl_{dataset}"] = ppl.get("value")
        row[f"ppl_{dataset}_ci_low"] = ppl.get("ci_low")
        row[f"ppl_{dataset}_ci_high"] = ppl.get("ci_high")
        row[f"ppl_{dataset}_n_windows"] = ppl.get("n_windows")
        if ppl.get("vs_baseline"):
            row[f"ppl_ratio_{dataset}"] = ppl["vs_baseline"].get("ppl_ratio")
            row[f"ppl_ratio_{dataset}_ci_low"], row[f"ppl_ratio_{dataset}_ci_high"] = _interval_from_nll_delta(
                ppl["vs_baseline"]
            )
    for dataset, protocol in ((record.get("eval_protocol") or {}).get("ppl") or {}).items():
        row[f"ppl_{dataset}_seqlen"] = protocol.get("seqlen")
        row[f"ppl_{dataset}_n_windows_total"] = protocol.get("n_windows_total")
    for dataset, ppl in ((record.get("baseline") or {}).get("ppl") or {}).items():
        row[f"baseline_ppl_{dataset}"] = ppl.get("value")
        row[f"baseline_ppl_{dataset}_ci_low"] = ppl.get("ci_low")
        row[f"baseline_ppl_{dataset}_ci_high"] = ppl.get("ci_high")
    if index == 0 and record.get("expected"):
        # Published values describe the configured method only, never the comparisons beside it.
        row["expected_source"] = record["expected"].get("source")
        for dataset, value in (record["expected"].get("ppl") or {}).items():
            row[f"expected_ppl_{dataset}"] = value
        for dataset, distance in (record.get("vs_expected") or {}).items():
            row[f"rel_diff_ppl_{dataset}"] = distance.get("rel_diff")
    return row


def record_rows(record_path: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry_row(record_path, record, i, entry) for i, entry in enumerate(method_entries(record))]


def drop_duplicates(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep one row per (config_hash, method entry): the latest finished `ok` one, else the latest.

    Reruns of one configuration (a resumed sweep, a job run twice) would otherwise count twice in
    every table and plot. Rows without a config_hash cannot be matched and are all kept."""
    if frame.empty:
        return frame, 0
    hashed = frame[frame["config_hash"].notna()]
    # Sort so that the preferred row of each group comes last: ok over failed, then latest.
    ranked = hashed.assign(_ok=hashed["status"].eq("ok"), _when=hashed["finished_at"].fillna(hashed["started_at"]))
    ranked = ranked.sort_values(["_ok", "_when"], na_position="first", kind="stable")
    kept = ranked.drop_duplicates(subset=DUPLICATE_KEY, keep="last").index
    result = frame.loc[frame.index.isin(kept) | frame["config_hash"].isna()]
    return result, len(frame) - len(result)


def _as_integers(column: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(column, errors="coerce")
    whole = numeric.dropna()
    if column.notna().sum() != len(whole) or not (whole == whole.round()).all():
        return column  # not all integers (a hand-edited record): leave it as found
    return numeric.astype("Int64")


def load_runs(paths: Iterable[Path | str], dedupe: bool = True) -> pd.DataFrame:
    """One row per (run, method entry) of every readable result.json under `paths`.

    Unreadable files are skipped with a warning on stderr; failed runs are kept (status "failed",
    their error in `error`) for `select` to exclude. With `dedupe`, repeated configurations keep
    one row each and the number dropped is said on stderr and kept in `frame.attrs`."""
    rows = []
    for path in find_result_files(paths):
        record = read_record(path)
        if record is not None:
            try:
                rows.extend(record_rows(path, record))
            except (AttributeError, TypeError, ValueError, KeyError) as error:  # a hand-edited or foreign JSON
                warn(f"skipping {path}: not a well-formed run record ({type(error).__name__}: {error})")
    frame = pd.DataFrame(rows)
    for column in RUN_COLUMNS:
        if column not in frame:
            frame[column] = None
    frame = frame[RUN_COLUMNS + [c for c in frame.columns if c not in RUN_COLUMNS]]
    integers = INTEGER_COLUMNS + [c for c in frame.columns if c.endswith(("_n_windows", "_n_windows_total", "_seqlen"))]
    for column in integers:
        frame[column] = _as_integers(frame[column])
    dropped = 0
    if dedupe:
        frame, dropped = drop_duplicates(frame)
        if dropped:
            warn(f"dropped {dropped} duplicate method entr{'y' if dropped == 1 else 'ies'} (same config_hash): "
                 "kept the latest finished ok run of each")
    frame = frame.reset_index(drop=True)
    frame.attrs["dropped_duplicates"] = dropped
    return frame


_BLOCK_INDEX = re.compile(r"\.(\d+)\.")  # model.layers.<i>.self_attn.q_proj, model.decoder.layers.<i>.fc1


def layer_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for layer in entry.get("layers") or []:
        name = layer.get("name", "")
        block = _BLOCK_INDEX.search(name)
        rows.append({
            "layer": name, "block": int(block.group(1)) if block else None, "role": name.rsplit(".", 1)[-1],
            "rel_weight_error": layer.get("rel_weight_error"), "bits_per_weight": layer.get("bits_per_weight"),
            "allocation": (layer.get("info") or {}).get("allocation"),  # per-group widths (SliM-LLM)
        })
    return rows


ENTRY_KEYS = ("run_dir", "entry_index", "name", "model", "method", "method_options", "bits", "group_size", "avg_bits")


def _entry_rows(runs: pd.DataFrame, rows_of: Any) -> pd.DataFrame:
    """Rows read back from the record of each method entry in `runs` (`rows_of(entry)` gives them),
    each prefixed with the entry's ENTRY_KEYS."""
    rows = []
    for path, entries in runs.groupby("record_path", sort=False):
        record = read_record(Path(path))
        if record is None:
            continue
        all_entries = method_entries(record)
        for _, run in entries.iterrows():
            keys = {k: run[k] for k in ENTRY_KEYS}
            rows.extend({**keys, **row} for row in rows_of(all_entries[int(run["entry_index"])]))
    return pd.DataFrame(rows)


def load_layers(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-linear rows (block index, role such as q_proj, relative weight error) of each method
    entry in `runs`, read back from its record: layers are too many to carry in `load_runs`."""
    return _entry_rows(runs, layer_rows)


def _curve_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    fine_tune = entry.get("fine_tune") or {}
    columns = fine_tune.get("curve_columns", ["step", "loss", "lr"])
    return [dict(zip(columns, point)) for point in fine_tune.get("curve") or []]


def load_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """The training loss curve (step, loss, lr) of each method entry in `runs` that fine-tuned
    (QAT's `fine_tune` record), one row per step, read back from its record."""
    return _entry_rows(runs, _curve_rows)
