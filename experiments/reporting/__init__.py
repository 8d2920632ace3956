"""Reports over run records (`result.json`): tables for papers and plots, from Python or the CLI.

    from experiments.reporting import load_runs, parse_metric, pareto_plot, pivot, select
    runs = select(load_runs(["outputs/multiruns"]), filters=["bits=3,4"])   # a DataFrame
    metric = parse_metric("ppl:wikitext2", runs)                            # None: first dataset
    print(pivot(runs, metric, rows=["model", "method"], columns=["bits"]).markdown())
    pareto_plot(runs, metric, "pareto.png")                                 # returns the Figure

`experiments/report.py` is the `quantlab-report` command over the same functions.
"""

from experiments.reporting.metrics import Metric, parse_metric
from experiments.reporting.plots import bitmap_plot, layers_plot, pareto_plot
from experiments.reporting.records import ReportError, load_layers, load_runs
from experiments.reporting.selection import select
from experiments.reporting.tables import PivotTable, pivot

__all__ = [
    "Metric", "PivotTable", "ReportError", "bitmap_plot", "layers_plot", "load_layers", "load_runs", "parse_metric", "pareto_plot",
    "pivot", "select",
]
