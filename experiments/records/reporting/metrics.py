"""The quantity a table cell or a plot's y axis shows, named on the command line as `--metric`:

    ppl:<dataset>         perplexity with its 95% interval (default: the first dataset found)
    ppl_ratio:<dataset>   paired PPL ratio to the fp16 baseline on the same windows, with its interval
    <column>              any numeric column of `load_runs` (quantize_s, model_bytes, ...), no interval
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from quantlab.experiments.records.reporting.records import ReportError

INTERVAL_KINDS = ("ppl", "ppl_ratio")


@dataclass(frozen=True)
class Metric:
    kind: str  # "ppl", "ppl_ratio" or "column"
    column: str
    dataset: str | None = None

    @property
    def has_interval(self) -> bool:
        return self.kind in INTERVAL_KINDS

    @property
    def ci_low(self) -> str | None:
        return f"{self.column}_ci_low" if self.has_interval else None

    @property
    def ci_high(self) -> str | None:
        return f"{self.column}_ci_high" if self.has_interval else None

    @property
    def baseline_column(self) -> str | None:
        """Where the fp16 baseline's value of this metric lives (a ratio's baseline is 1 by definition)."""
        return f"baseline_ppl_{self.dataset}" if self.kind == "ppl" else None

    @property
    def expected_column(self) -> str | None:
        return f"expected_ppl_{self.dataset}" if self.kind == "ppl" else None

    @property
    def rel_diff_column(self) -> str | None:
        return f"rel_diff_ppl_{self.dataset}" if self.kind == "ppl" else None

    @property
    def short(self) -> str:
        """Sub-column header of the metric in a pivot table."""
        return {"ppl": "ppl", "ppl_ratio": "ppl ratio"}.get(self.kind, self.column)

    @property
    def title(self) -> str:
        return {"ppl": "perplexity", "ppl_ratio": "perplexity ratio to fp16"}.get(self.kind, self.column)

    @property
    def label(self) -> str:
        """Axis label, with the unit or reading direction."""
        if self.kind == "ppl":
            return f"perplexity on {self.dataset} (lower is better)"
        if self.kind == "ppl_ratio":
            return f"perplexity ratio to fp16 on {self.dataset} (paired, lower is better)"
        return self.column


def datasets(frame: pd.DataFrame) -> list[str]:
    """Evaluation datasets with at least one measured perplexity, in the order first found."""
    return [
        c[len("ppl_"):-len("_n_windows")] for c in frame.columns
        if c.startswith("ppl_") and c.endswith("_n_windows") and frame[c].notna().any()
    ]


def parse_metric(text: str | None, frame: pd.DataFrame) -> Metric:
    found = datasets(frame)
    if text is None:
        if not found:
            raise ReportError("no perplexity in the selected runs; choose a column with --metric")
        return Metric("ppl", f"ppl_{found[0]}", found[0])
    kind, sep, dataset = text.partition(":")
    if sep:
        if kind not in INTERVAL_KINDS:
            raise ReportError(f"--metric {text!r}: expected {' or '.join(k + ':<dataset>' for k in INTERVAL_KINDS)}")
        if dataset not in found:
            raise ReportError(f"--metric {text!r}: no {dataset!r} perplexity in the selected runs "
                              f"(datasets: {', '.join(found) or 'none'})")
        return Metric(kind, f"{kind}_{dataset}", dataset)
    if text not in frame.columns or not pd.api.types.is_numeric_dtype(frame[text]):
        raise ReportError(f"--metric {text!r}: not a numeric column; use ppl:<dataset> "
                          f"(datasets: {', '.join(found) or 'none'}) or a column such as quantize_s")
    return Metric("column", text)


def protocol_text(frame: pd.DataFrame, metric: Metric) -> str:
    """How the metric's dataset was evaluated, e.g. "40 of 148 windows x 2048 tokens"; several
    protocols in one selection are all listed, since their numbers are not comparable."""
    if metric.dataset is None:
        return ""
    prefix = f"ppl_{metric.dataset}"
    columns = [f"{prefix}_n_windows", f"{prefix}_n_windows_total", f"{prefix}_seqlen"]
    if not set(columns) <= set(frame.columns):
        return metric.dataset
    seen = frame[columns].dropna(subset=[columns[0]]).drop_duplicates()
    parts = [
        f"{int(n)} of {int(total) if pd.notna(total) else '?'} windows x {int(seqlen) if pd.notna(seqlen) else '?'} tokens"
        for n, total, seqlen in seen.itertuples(index=False)
    ]
    text = "; ".join(parts)
    return f"{metric.dataset}: {'MIXED protocols: ' if len(parts) > 1 else ''}{text}"
