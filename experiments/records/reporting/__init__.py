"""Reports over run records (`result.json`): tables for papers and plots, from Python or the CLI.

    from quantlab.experiments.records.reporting import load_runs, parse_metric, pareto_plot, pivot, select
    runs = select(load_runs(["outputs/multiruns"]), filters=["bits=3,4"])   # a DataFrame
    metric = parse_metric("ppl:wikitext2", runs)                            # None: first dataset
    print(pivot(runs, metric, rows=["model", "method"], columns=["bits"]).markdown())
    pareto_plot(runs, metric, "pareto.png")                                 # returns the Figure

- `records.py` loads the records (one row per method entry), `selection.py` filters them,
  `metrics.py` names what a table shows, `tables.py` pivots it (markdown, LaTeX, CSV), `plots.py`
  draws, `versus.py` pairs entries with a reference method window by window, `replicates.py`
  folds runs that differ only in seed / calib.seed into mean ± sd;
- `text.py`: the plain-text tables (the quickstart's closing table, `--versus`);
- `cli.py`: the `quantlab-report` command over the same functions.
"""

from quantlab.experiments.records.reporting.metrics import Metric, parse_metric
from quantlab.experiments.records.reporting.plots import bitmap_plot, layers_plot, loss_plot, pareto_plot
from quantlab.experiments.records.reporting.records import ReportError, load_curves, load_layers, load_runs
from quantlab.experiments.records.reporting.replicates import combine_replicates
from quantlab.experiments.records.reporting.selection import select
from quantlab.experiments.records.reporting.tables import PivotTable, pivot

__all__ = [
    "Metric", "PivotTable", "ReportError", "bitmap_plot", "combine_replicates", "layers_plot", "load_curves", "load_layers", "loss_plot", "load_runs", "parse_metric", "pareto_plot",
    "pivot", "select",
]
