"""Figures: the bits-per-weight / perplexity Pareto plot of a sweep, one run's per-layer error,
one run's bit map (each group's width in each linear, for per-group mixed precision: SliM-LLM),
and the training loss curves of fine-tuning methods (QAT).

All draw on a bare `Figure` with the Agg canvas (no pyplot, so no display and no global state:
safe on a headless node and inside a notebook alike) and return it, so that callers and tests can
read its axes; given `out`, they also write a PNG there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from quantlab.experiments.records.reporting.metrics import Metric, protocol_text
from quantlab.experiments.records.reporting.records import FP16, ReportError
from quantlab.experiments.records.reporting.tables import format_key

MARKERS = "osD^vPX*"
LOG_SCALE_SPAN = 10  # a y range wider than this factor (a collapsed 2-bit model) goes on a log axis
MAX_ANNOTATED_POINTS = 24  # beyond this, point labels overlap more than they help
MAX_LAYER_PANELS = 6
BITS_AXIS_LABEL = "bits per weight (average over the quantized linears)"
WEIGHT_ERROR_LABEL = r"relative weight error $\|W-\hat{W}\|_F\,/\,\|W\|_F$"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _log_if_wide(ax, values: pd.Series) -> None:
    values = values[values > 0]
    if len(values) and values.max() / values.min() > LOG_SCALE_SPAN:
        ax.set_yscale("log")


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both axes (fewer bits and lower y), by increasing x."""
    front, best = [], float("inf")
    for index, point in points.sort_values([x, y]).iterrows():
        if point[y] < best:
            front.append(index)
            best = point[y]
    return points.loc[front]


def _point_label(entry: pd.Series) -> str:
    return f"{format_key(entry['bits'], 'bits')} g{format_key(entry['group_size'], 'group_size')}"


def _baselines(runs: pd.DataFrame, metric: Metric) -> list[tuple[str, float]]:
    """(label, y) of the fp16 reference line(s): each model's measured baseline, or 1 for a ratio."""
    if metric.kind == "ppl_ratio":
        return [("fp16 baseline (16 bits/weight): ratio 1", 1.0)]
    column = metric.baseline_column
    if column is None or column not in runs:
        return []
    values = runs.dropna(subset=[column]).groupby("model", sort=True)[column].last()
    several = len(values) > 1
    return [(f"fp16 baseline{' ' + model if several else ''} (16 bits/weight): {value:.2f}", value)
            for model, value in values.items()]


def pareto_plot(runs: pd.DataFrame, metric: Metric, out: Path | str | None = None) -> Figure:
    """Bits per weight (x) against `metric` (y) for every quantized entry in `runs`: one marker per
    method, a line along each method's Pareto front, error bars from the 95% interval, and the
    fp16 baseline as a dashed line."""
    points = runs[runs["method"].ne(FP16) & runs[metric.column].notna() & runs["avg_bits"].notna()]
    if points.empty:
        raise ReportError(f"nothing to plot: no quantized entry has both avg_bits and {metric.column}")
    models = sorted(points["model"].dropna().unique())
    series = ["model", "method"] if len(models) > 1 else ["method"]
    figure = _new_figure(7.5, 5)
    ax = figure.add_subplot()
    shown = [points[metric.column]]
    for i, (key, group) in enumerate(points.groupby(series, sort=True)):
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        y = group[metric.column]
        yerr = None
        if metric.has_interval and group[metric.ci_low].notna().all():
            yerr = [y - group[metric.ci_low], group[metric.ci_high] - y]
            shown += [group[metric.ci_low], group[metric.ci_high]]
        ax.errorbar(group["avg_bits"], y, yerr=yerr, fmt=marker, color=color, capsize=3, markersize=6,
                    label=" ".join(map(str, key)))
        front = pareto_front(group, "avg_bits", metric.column)
        ax.plot(front["avg_bits"], front[metric.column], "-", color=color, linewidth=1.5)
        if len(points) <= MAX_ANNOTATED_POINTS:
            for _, entry in group.iterrows():
                # Alternate above/below by series: methods at equal bits would print over each other.
                ax.annotate(_point_label(entry), (entry["avg_bits"], entry[metric.column]), textcoords="offset points",
                            xytext=(5, 4 if i % 2 == 0 else -11), fontsize=7, color=color)
    for label, value in _baselines(runs, metric):
        ax.axhline(value, linestyle="--", color="0.35", linewidth=1, label=label)
        shown.append(pd.Series([value]))
    _log_if_wide(ax, pd.concat(shown, ignore_index=True).astype(float))
    ax.set_xlabel(BITS_AXIS_LABEL)
    ax.set_ylabel(metric.label)
    protocol = protocol_text(points, metric)
    ax.set_title(f"{', '.join(models)}: {metric.title} against bits per weight" + (f"\n{protocol}" if protocol else ""),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if out is not None:
        figure.savefig(out, dpi=150)
    return figure


def layers_plot(layers: pd.DataFrame, out: Path | str | None = None) -> Figure:
    """Per-layer relative weight error by block index, one line per linear role (q_proj, ...),
    one panel per method entry (a run and its comparisons side by side, on a shared y axis)."""
    layers = layers.dropna(subset=["block", "rel_weight_error"]) if not layers.empty else layers
    if layers.empty:
        raise ReportError("nothing to plot: the selected entries have no per-layer records (fp16, or unfinished)")
    entries = list(layers.groupby(["run_dir", "entry_index"], sort=False))
    if len(entries) > MAX_LAYER_PANELS:
        raise ReportError(f"the layers plot shows one run: {len(entries)} method entries are selected "
                          f"(at most {MAX_LAYER_PANELS}); give one run directory or narrow with --filter")
    roles = list(dict.fromkeys(layers["role"]))  # module order within a block: q, k, v, o, gate, up, down
    colors = {role: f"C{i % 10}" for i, role in enumerate(roles)}
    width = 2 + 4.5 * len(entries)
    figure = _new_figure(width, 5)
    axes = figure.subplots(1, len(entries), sharey=True, squeeze=False)[0]
    for ax, (_, entry) in zip(axes, entries):
        for role, lines in entry.groupby("role", sort=False):
            lines = lines.sort_values("block")
            ax.plot(lines["block"], lines["rel_weight_error"], marker=".", color=colors[role], label=role)
        first = entry.iloc[0]
        ax.set_title(f"{first['method']} {_point_label(first)}: {first['avg_bits']:.3f} bits/weight", fontsize=10)
        ax.set_xlabel("transformer block index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(WEIGHT_ERROR_LABEL)
    _log_if_wide(axes[0], layers["rel_weight_error"].astype(float))
    runs = ", ".join(dict.fromkeys(str(n) for n in layers["name"].dropna()))
    figure.suptitle(f"{layers['model'].iloc[0]}: per-layer weight error" + (f" ({runs})" if runs else ""), fontsize=11)
    legend = {}  # one entry per role, whichever panel drew it
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    # Below the panels, in one row: beside them it would collide with the title of a one-panel figure.
    figure.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(len(legend), int(width / 1.3)),
                  title="linear layer role", fontsize=8)
    if out is not None:
        figure.savefig(out, dpi=150)
    return figure


def bitmap_plot(layers: pd.DataFrame, out: Path | str | None = None, layer: str | None = None) -> Figure:
    """Each group's bit width (columns: group index along the input columns) for every linear of
    one method entry that records an allocation (rows, in record order), or only the linears whose
    name contains `layer`."""
    if not layers.empty and "allocation" in layers:
        layers = layers[layers["allocation"].map(lambda a: isinstance(a, list) and len(a) > 0)]
    else:
        layers = layers.iloc[0:0]
    if layer is not None and not layers.empty:
        layers = layers[layers["layer"].str.contains(layer, regex=False)]
    if layers.empty:
        raise ReportError("nothing to plot: no selected layer records a per-group allocation"
                          + (f" with {layer!r} in its name" if layer else " (a mixed-precision method: slim_llm)"))
    entries = list(layers.groupby(["run_dir", "entry_index"], sort=False))
    if len(entries) > 1:
        raise ReportError(f"the bit map shows one run: {len(entries)} method entries are selected; give one run "
                          "directory or narrow with --filter")
    widths = list(layers["allocation"])
    n_groups = max(len(w) for w in widths)
    grid = np.full((len(widths), n_groups), np.nan)
    for row, w in enumerate(widths):
        grid[row, : len(w)] = w
    low, high = int(np.nanmin(grid)), int(np.nanmax(grid))
    figure = _new_figure(min(3 + 0.25 * n_groups, 16), min(2 + 0.3 * len(widths), 20))
    ax = figure.add_subplot()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=colormaps["viridis"].resampled(high - low + 1),
                      vmin=low - 0.5, vmax=high + 0.5)
    colorbar = figure.colorbar(image, ax=ax, ticks=range(low, high + 1))
    colorbar.set_label("bits of the group")
    ax.set_xlabel("group index (input columns / group size)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yticks(range(len(widths)), list(layers["layer"]), fontsize=7 if len(widths) > 20 else 9)
    first = layers.iloc[0]
    ax.set_title(f"{first['model']}: {first['method']} {_point_label(first)}, {first['avg_bits']:.3f} bits/weight",
                 fontsize=10)
    if out is not None:
        figure.savefig(out, dpi=150)
    return figure


def sensitivity_heatmap(matrix: pd.DataFrame, out: Path | str | None = None, title: str = "",
                        label: str = "ΔNLL (mean paired NLL increase over full precision)") -> Figure:
    """Blocks (rows) × linear roles (columns) of a sensitivity record (reporting/sensitivity.py
    `damage_matrix`), colour = the measured damage of quantizing that unit alone; a diverging map
    centred on 0, since a unit's measured ΔNLL can be negative within its noise."""
    if matrix.empty:
        raise ReportError("nothing to plot: the sensitivity record has no units")
    values = matrix.to_numpy(dtype=float)
    span = float(np.nanmax(np.abs(values))) or 1.0
    figure = _new_figure(3 + 1.0 * matrix.shape[1], 2 + 0.25 * matrix.shape[0])
    ax = figure.add_subplot()
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=colormaps["RdBu_r"], vmin=-span, vmax=span)
    figure.colorbar(image, ax=ax).set_label(label)
    ax.set_xticks(range(matrix.shape[1]), [str(c).split(".")[-1] for c in matrix.columns], rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index], fontsize=7 if matrix.shape[0] > 20 else 9)
    ax.set_xlabel("linear role")
    ax.set_ylabel("transformer block index")
    ax.set_title(title, fontsize=10)
    if out is not None:
        figure.savefig(out, dpi=150)
    return figure


def loss_plot(curves: pd.DataFrame, out: Path | str | None = None) -> Figure:
    """Training loss (left axis) and learning rate (right axis, dotted) against the step, one line
    per method entry that fine-tuned (QAT records `fine_tune.curve`)."""
    if curves.empty:
        raise ReportError("nothing to plot: no selected entry records a training loss curve (method=qat)")
    figure = _new_figure(7.5, 4.5)
    ax = figure.add_subplot()
    rate_axis = ax.twinx()
    for i, ((_, _), entry) in enumerate(curves.groupby(["run_dir", "entry_index"], sort=False)):
        first = entry.iloc[0]
        label = f"{first['name'] or first['method']}: {first['method']} {_point_label(first)}"
        if isinstance(first.get("method_options"), str) and first["method_options"]:
            label += f" ({first['method_options']})"  # what tells two runs of one setting apart
        ax.plot(entry["step"], entry["loss"], color=f"C{i % 10}", label=label)
        rate_axis.plot(entry["step"], entry["lr"], color=f"C{i % 10}", linestyle=":", alpha=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("next-token loss on the step's calibration batch")
    rate_axis.set_ylabel("learning rate (dotted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{curves['model'].iloc[0]}: quantization-aware training", fontsize=10)
    if out is not None:
        figure.savefig(out, dpi=150)
    return figure
