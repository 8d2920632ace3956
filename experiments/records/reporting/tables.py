"""Pivot tables for papers: rows (default model, method, group size) by columns (default bits),
each cell "value ± half-interval" of one metric beside the entry's average bits per weight, the
fp16 baseline as its own row, and for paper configs the published value and our relative delta.

Rendered as markdown (for notes and READMEs), booktabs LaTeX (for papers) or CSV (for scripts).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from quantlab.experiments.records.reporting.metrics import Metric, protocol_text
from quantlab.experiments.records.reporting.records import FP16, ReportError, is_null, warn
from quantlab.experiments.records.reporting.replicates import REPLICATES, has_folded
from quantlab.experiments.records.reporting.text import render

DEFAULT_ROWS = ["model", "method", "method_options", "group_size"]
DEFAULT_COLUMNS = ["bits"]
DESCENDING = {"bits", "avg_bits"}  # papers list precision from high to low: W16, W4, W3
BPW = "bpw"
PUBLISHED = "published"
DELTA = "Δ vs published"
PER_SEED = "per seed"  # the replicates' values behind a mean ± sd cell: CSV only (too wide for a paper)
MISSING = "-"


def format_number(value: Any, digits: int) -> str:
    if is_null(value):
        return MISSING
    value = float(value)
    if value != 0 and not 10 ** -digits <= abs(value) < 1e4:
        return f"{value:.{digits}e}"  # a collapsed 2-bit model's 3.5e6 stays readable
    return f"{value:.{digits}f}"


def format_interval(value: Any, low: Any, high: Any, digits: int) -> str:
    if is_null(value):
        return MISSING
    if is_null(low) or is_null(high):
        return format_number(value, digits)
    # The PPL interval is asymmetric (a t interval on the mean NLL, through exp); half its width
    # is the customary single ± figure, as in the quickstart table.
    return f"{format_number(value, digits)} ± {format_number((high - low) / 2, digits)}"


def format_key(value: Any, key: str) -> str:
    """A row or column label: integers without ".0", bits as W<b>, nulls as "-"."""
    if is_null(value):
        return MISSING
    if isinstance(value, numbers.Real) and float(value).is_integer():
        value = int(value)
    return f"W{value}" if key == "bits" else str(value)


def sort_key(value: Any, key: str) -> tuple:
    if is_null(value):
        return (0,)
    if key == "method" and value == FP16:
        return (0,)  # the baseline row leads its model's rows
    if isinstance(value, numbers.Real):
        return (1, -float(value) if key in DESCENDING else float(value))
    return (2, str(value))


def baseline_entries(runs: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """The fp16 baseline the selected runs measured, as entry rows (method fp16, 16 bits per weight),
    one per model and protocol: a sweep computes it once and every run of the sweep repeats it."""
    column = metric.baseline_column
    if column is None or column not in runs:
        return runs.iloc[0:0]
    source = runs[runs[column].notna()]
    protocol = [c for c in runs.columns if c.startswith(f"ppl_{metric.dataset}_") and not c.endswith("_ci_low")
                and not c.endswith("_ci_high")]
    base = pd.DataFrame({
        **{c: source[c] for c in ["run_dir", "model", "started_at", "finished_at", *protocol]},
        "method": FP16, "method_options": "", "bits": 16, "group_size": None, "avg_bits": 16.0, "status": "ok",
        "model_bytes": source["fp16_model_bytes"],
        metric.column: source[column], metric.ci_low: source[f"{column}_ci_low"],
        metric.ci_high: source[f"{column}_ci_high"],
    })
    return base.drop_duplicates(subset=["model", metric.column, metric.ci_low, metric.ci_high], keep="last")


@dataclass
class PivotTable:
    """The table (index: row keys; columns: (column label, field)) and the notes that go under it."""

    frame: pd.DataFrame
    metric: Metric
    notes: list[str] = field(default_factory=list)

    def flat(self, per_seed: bool = False) -> pd.DataFrame:
        """Row keys as columns, headers joined ("W4 ppl"): the shape of markdown and CSV."""
        flat = self.frame if per_seed else self.printed()
        flat = flat.copy()
        flat.columns = [f"{label} {name}".strip() for label, name in flat.columns]
        return flat.reset_index()

    def printed(self) -> pd.DataFrame:
        """The table without its per-seed columns, as markdown and LaTeX show it."""
        return self.frame.drop(columns=[c for c in self.frame.columns if c[1] == PER_SEED])

    def markdown(self) -> str:
        table = render(self.flat().astype(str).to_dict("records"))
        return "\n".join([table, *self.notes])

    def csv(self) -> str:
        return self.flat(per_seed=True).to_csv(index=False)

    def latex(self) -> str:
        shown = self.printed()
        frame = shown.reset_index()
        frame.columns = pd.MultiIndex.from_tuples(
            [(c, "") if not isinstance(c, tuple) else c for c in frame.columns]
        )
        n_keys = len(shown.index.names)
        text = frame.to_latex(
            index=False, escape=True, multicolumn=True, multicolumn_format="c",
            column_format="l" * n_keys + "r" * (frame.shape[1] - n_keys),
            caption=latex_escape(". ".join(self.notes) + "."), label=f"tab:{self.metric.column.replace('_', '-')}",
        )
        text = _add_cmidrules(text, shown.columns, n_keys)
        # escape=True leaves non-ASCII as is; a paper's preamble should not need utf8 symbols.
        return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")

    def render(self, fmt: str) -> str:
        return {"markdown": self.markdown, "latex": self.latex, "csv": self.csv}[fmt]()


def render_flat(frame: pd.DataFrame, fmt: str) -> str:
    """Any frame (e.g. `load_runs`'s own rows) in one of the table formats, nulls shown as "-"."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    shown = frame.astype(object).where(frame.notna(), MISSING).astype(str)
    if fmt == "latex":
        return shown.to_latex(index=False, escape=True)
    return render(shown.to_dict("records"))


def latex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(replacements.get(ch, ch) for ch in text)


def _add_cmidrules(text: str, columns: pd.MultiIndex, n_keys: int) -> str:
    """Underline each spanning column header (booktabs \\cmidrule), as paper tables do."""
    rules, start = [], n_keys + 1
    for label in dict.fromkeys(label for label, _ in columns):
        width = sum(1 for lab, _ in columns if lab == label)
        if label:
            rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(r"\toprule")) + 1
    if rules:
        lines.insert(header + 1, " ".join(rules))
    return "\n".join(lines) + "\n"


def _check_keys(runs: pd.DataFrame, keys: list[str], option: str) -> None:
    unknown = [k for k in keys if k not in runs.columns]
    if unknown:
        raise ReportError(f"{option}: no column {', '.join(map(repr, unknown))}; columns: {', '.join(runs.columns)}")


def _cell(entry: pd.Series, metric: Metric, digits: int, with_published: bool, with_seeds: bool) -> dict[str, str]:
    replicates = entry.get(REPLICATES)
    if not is_null(replicates) and replicates > 1:  # several seeds folded (replicates.py): mean ± sample sd
        sd_column = f"{metric.column}_sd"  # absent for a column replicates.py only averages (avg_bits)
        spread = f" ± {format_number(entry.get(sd_column), digits)}" if sd_column in entry.index else ""
        value = f"{format_number(entry.get(metric.column), digits)}{spread} (n={int(replicates)})"
    else:
        value = format_interval(entry.get(metric.column), entry.get(metric.ci_low), entry.get(metric.ci_high), digits)
    if entry.get("status") != "ok":  # shown only with --include-failed
        value = "failed" if value == MISSING else f"{value} (failed)"
    cell = {metric.short: value, BPW: format_number(entry.get("avg_bits"), 2)}
    if with_seeds:
        per_seed = entry.get(f"{metric.column}_per_seed")
        cell[PER_SEED] = MISSING if is_null(per_seed) else str(per_seed)
    if with_published:
        cell[PUBLISHED] = format_number(entry.get(metric.expected_column), digits)
        rel = entry.get(metric.rel_diff_column)
        cell[DELTA] = MISSING if is_null(rel) else f"{rel:+.1%}"
    return cell


def pivot(
    runs: pd.DataFrame, metric: Metric, rows: list[str] | None = None, columns: list[str] | None = None,
    digits: int = 2,
) -> PivotTable:
    """Pivot the selected method entries of `load_runs` (see `select`) on `metric`.

    Entries folded over seeds (`combine_replicates`) show mean ± sample sd (n=k). A cell that several
    entries still fall into (other calibration sets, reruns with a new config; other seeds when they
    were not folded) shows the latest finished one, with a warning: add the key that separates them
    to `rows` or `columns`, or narrow the selection."""
    rows = list(DEFAULT_ROWS if rows is None else rows)
    columns = list(DEFAULT_COLUMNS if columns is None else columns)
    if "method_options" in rows and ("method_options" not in runs or runs["method_options"].fillna("").eq("").all()):
        rows.remove("method_options")  # no variant in this selection: an empty column says nothing
    _check_keys(runs, rows + columns, "--rows/--columns")
    keys = rows + columns
    # Entries that did not measure this metric have no place in its table, unless they failed.
    measured = runs[runs[metric.column].notna() | runs["status"].ne("ok")] if metric.column in runs else runs.iloc[0:0]
    entries = pd.concat(
        [measured.assign(_own_entry=True), baseline_entries(runs, metric).assign(_own_entry=False)], ignore_index=True
    )
    if entries.empty:
        raise ReportError(f"no selected run has {metric.column}")
    for key in keys:  # one null (None) and one type per key, so that equal keys group together
        entries[key] = entries[key].astype(object).where(entries[key].notna(), None)
    _warn_conflicts(entries, keys, metric)
    # Preferred entry of a cell last: finished ok, a run of its own over the baseline it repeats, latest.
    entries["_ok"] = entries["status"].eq("ok")
    entries["_when"] = entries["finished_at"].fillna(entries["started_at"]).fillna("")
    entries = entries.sort_values(["_ok", "_own_entry", "_when"], kind="stable")
    chosen = entries.drop_duplicates(subset=keys, keep="last")

    with_published = bool(metric.expected_column and metric.expected_column in chosen
                          and chosen[metric.expected_column].notna().any())
    with_seeds = has_folded(chosen)
    cells: dict[tuple, dict[tuple, str]] = {}
    column_labels: dict[tuple, str] = {}
    for _, entry in chosen.iterrows():
        row_key = tuple(entry[k] for k in rows)
        column_key = tuple(entry[k] for k in columns)
        column_labels[column_key] = " ".join(format_key(v, k) for v, k in zip(column_key, columns))
        for name, text in _cell(entry, metric, digits, with_published, with_seeds).items():
            cells.setdefault(row_key, {})[(column_key, name)] = text

    def ordered(key_tuples, names):
        return sorted(key_tuples, key=lambda t: tuple(sort_key(v, k) for v, k in zip(t, names)))

    fields = [metric.short, BPW] + ([PUBLISHED, DELTA] if with_published else []) + ([PER_SEED] if with_seeds else [])
    column_order = [(c, f) for c in ordered(column_labels, columns) for f in fields]
    row_order = ordered(cells, rows)
    table = pd.DataFrame(
        [[cells[r].get(c, MISSING) for c in column_order] for r in row_order],
        index=pd.MultiIndex.from_tuples([tuple(format_key(v, k) for v, k in zip(r, rows)) for r in row_order],
                                        names=rows),
        columns=pd.MultiIndex.from_tuples([(column_labels[c], f) for c, f in column_order]),
    )
    # A published value exists for a few paper rows only: keep its sub-columns where it does.
    empty = [c for c in table.columns if c[1] in (PUBLISHED, DELTA) and table[c].eq(MISSING).all()]
    return PivotTable(table.drop(columns=empty), metric, _notes(chosen, metric, with_published, with_seeds))


def _warn_conflicts(entries: pd.DataFrame, keys: list[str], metric: Metric) -> None:
    values = entries.groupby(keys, dropna=False, sort=False)[metric.column].nunique()
    conflicts = values[values > 1]
    if len(conflicts):
        example = " ".join(format_key(v, k) for v, k in zip(conflicts.index[0], keys))
        warn(f"{len(conflicts)} table cell(s) hold several runs with different {metric.column} (e.g. {example}): "
             "showing the latest of each; separate them with --rows/--columns (seed, calib_dataset, config_hash, "
             "...), narrow with --filter, or fold seeds with --replicates mean")


def _notes(chosen: pd.DataFrame, metric: Metric, with_published: bool, with_seeds: bool) -> list[str]:
    notes = []
    if metric.has_interval:
        notes.append(f"{metric.short}: {metric.label}; ± half the 95% interval")
    if with_seeds:
        notes.append(f"(n=k): mean ± sample sd over k seeds (seed / calib.seed); per-seed values in --format csv "
                     f"('{PER_SEED}') and --flat")
    protocol = protocol_text(chosen, metric)
    if protocol:
        notes.append(f"protocol: {protocol}")
    notes.append(f"{BPW}: average bits per weight over the quantized linears (fp16: 16)")
    if with_published:
        sources = sorted(chosen["expected_source"].dropna().unique())
        notes.append(f"published: {'; '.join(sources)}; {DELTA}: ours / published - 1")
    return notes
