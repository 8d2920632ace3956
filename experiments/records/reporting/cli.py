"""`quantlab-report`: tables and plots of the result.json files under the given paths.

    quantlab-report outputs/multiruns/                       # markdown: model/method/group size by bits
    quantlab-report runs/ --format latex --metric ppl:c4      # booktabs table of C4 perplexity
    quantlab-report runs/ --rows method,bits --columns model  # the GPTQ paper's layout
    quantlab-report runs/ --filter method=gptq,rtn --filter tags=smollm2 --format csv
    quantlab-report runs/ --plot pareto pareto.png            # bits per weight against perplexity
    quantlab-report runs/1_gptq-w3/ --plot layers layers.png  # one run's per-layer weight error
    quantlab-report runs/1_slim/ --plot bitmap bits.png --layer layers.3.mlp  # per-group widths (SliM-LLM)
    quantlab-report runs/1_qat-w3/ --plot loss loss.png      # QAT's training loss curve
    quantlab-report runs/ --flat --format csv                 # every method entry, every field
    quantlab-report runs/ --versus gptq                       # each entry against GPTQ, paired per window
    quantlab-report runs/ --versus gptq --match model,bits    # ... at the same nominal bits (VPTQ)
    quantlab-report runs/1_sens/ --sensitivity 3              # proxies ranked by Spearman ρ, worst units
    quantlab-report runs/1_sens/ --sensitivity 3 --plot heatmap heat.png  # blocks x roles, colour = ΔNLL at W3
    quantlab-report runs/ --replicates latest                 # one run per cell, not the seeds' mean

Failed and unfinished runs are left out unless --include-failed; repeated configurations keep
their latest finished run. Replicates (runs that differ only in seed / calib.seed) are folded into
mean ± sample sd (n seeds) with the per-seed values (--format csv, --flat), and --versus pairs them
seed by seed. The same functions serve notebooks: see experiments/records/reporting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantlab.experiments.records.record import RESULT_FILE
from quantlab.experiments.records.reporting import sensitivity
from quantlab.experiments.records.reporting.metrics import parse_metric
from quantlab.experiments.records.reporting.plots import (
    bitmap_plot,
    layers_plot,
    loss_plot,
    pareto_plot,
    sensitivity_heatmap,
)
from quantlab.experiments.records.reporting.records import (
    FP16,
    ReportError,
    load_curves,
    load_layers,
    load_runs,
    warn,
)
from quantlab.experiments.records.reporting.replicates import MODES, combine_replicates
from quantlab.experiments.records.reporting.selection import select
from quantlab.experiments.records.reporting.tables import DEFAULT_COLUMNS, DEFAULT_ROWS, pivot, render_flat
from quantlab.experiments.records.reporting.versus import MATCH_KEYS, format_versus, versus_table


def _keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlab-report", description=__doc__.splitlines()[0].split(": ", 1)[1].capitalize(),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("outputs"), Path("multirun")],
                        help="directories searched for result.json, or result.json files (default: outputs multirun)")
    parser.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    parser.add_argument("--rows", type=_keys, default=DEFAULT_ROWS, help="comma-separated row keys "
                        f"(default: {','.join(DEFAULT_ROWS)})")
    parser.add_argument("--columns", type=_keys, default=DEFAULT_COLUMNS, help="comma-separated column keys "
                        f"(default: {','.join(DEFAULT_COLUMNS)}; '' for none)")
    parser.add_argument("--metric", help="ppl:<dataset>, ppl_ratio:<dataset> or a numeric column "
                        "(default: ppl of the first dataset found)")
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                        help="keep entries whose column KEY is one of the values (repeatable, all must hold)")
    parser.add_argument("--include-failed", action="store_true", help="show failed and unfinished runs too")
    parser.add_argument("--digits", type=int, default=2, help="decimals of the metric (default: 2)")
    parser.add_argument("--flat", action="store_true", help="print every selected method entry, one row each")
    parser.add_argument("--sensitivity", type=int, metavar="BITS", help="read the sensitivity.json records under "
                        "the paths: proxies ranked by Spearman ρ with the measured damage and the most sensitive "
                        "units at BITS (with --plot heatmap: the blocks x roles map of ΔNLL at BITS)")
    parser.add_argument("--damage", choices=sorted(sensitivity.DAMAGES), default="nll_delta",
                        help="--sensitivity --plot heatmap: the colour (default: nll_delta)")
    parser.add_argument("--plot", nargs=2, metavar=("pareto|layers|bitmap|heatmap|loss", "OUT.png"),
                        help="write a plot instead of printing a table")
    parser.add_argument("--layer", help="--plot bitmap: only the linears whose name contains this")
    parser.add_argument("--versus", metavar="METHOD", help="pair every entry with METHOD's entry under the same "
                        "protocol: the PPL ratio per window with its 95%% interval (dataset from --metric ppl:<ds>)")
    parser.add_argument("--replicates", choices=MODES, default="mean", help="runs that differ only in seed / "
                        "calib.seed: 'mean' folds them into mean ± sample sd with per-seed values (a single seed "
                        "is unchanged), 'latest' keeps each run, a cell showing the latest (default: mean)")
    parser.add_argument("--match", type=_keys, help="--versus: the keys both entries share "
                        f"(default: {','.join(MATCH_KEYS)})")
    return parser


def sensitivity_report(args: argparse.Namespace) -> int:
    """--sensitivity BITS: the tables, or the heatmap with --plot heatmap."""
    records = sensitivity.load_sensitivity(args.paths)
    if args.plot:
        kind, out = args.plot
        if kind != "heatmap":
            raise ReportError(f"--sensitivity draws --plot heatmap, not {kind!r}")
        if len(records) > 1:
            raise ReportError(f"the heatmap shows one record: {len(records)} found; give one run directory")
        _, record = records[0]
        sensitivity_heatmap(sensitivity.damage_matrix(record, args.sensitivity, args.damage), out,
                            sensitivity.title(record, args.sensitivity), label=sensitivity.DAMAGES[args.damage])
        print(f"wrote heatmap: {out}")
        return 0
    for path, record in records:
        print(f"{sensitivity.title(record, args.sensitivity)}\n{path}\n")
        for frame in (sensitivity.proxy_ranking(record, args.sensitivity),
                      sensitivity.most_sensitive(record, args.sensitivity)):
            text = render_flat(frame.round(args.digits + 2), args.format)
            print(text, end="" if text.endswith("\n") else "\n")
            print()
    return 0


def report(args: argparse.Namespace) -> int:
    if args.sensitivity is not None:
        return sensitivity_report(args)
    runs = load_runs(args.paths)
    if runs.empty:
        raise ReportError(f"no readable {RESULT_FILE} under {', '.join(map(str, args.paths))}")
    selected = select(runs, args.filter, args.include_failed)
    if selected.empty:
        failed = int(runs["status"].ne("ok").sum())
        raise ReportError(f"{len(runs)} method entries found, none selected ({failed} from failed or unfinished "
                          "runs: --include-failed shows them; check --filter)")
    if args.versus:
        metric = parse_metric(args.metric, selected)
        if metric.dataset is None or metric.kind != "ppl":
            raise ReportError(f"--versus compares perplexities: use --metric ppl:<dataset>, not {args.metric!r}")
        table = versus_table(selected, args.versus, metric.dataset, args.match, args.replicates)
        text = render_flat(format_versus(table, metric.dataset, args.digits), args.format)
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    combined = combine_replicates(selected, args.replicates)  # per-layer plots read each run's own record
    if args.flat:
        text = render_flat(combined.drop(columns=["record_path"]), args.format)
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    if args.plot:
        kind, out = args.plot
        if kind == "pareto":
            pareto_plot(combined, parse_metric(args.metric, combined), out)
        elif kind == "layers":
            layers_plot(load_layers(selected[selected["method"].ne(FP16)]), out)
        elif kind == "bitmap":
            bitmap_plot(load_layers(selected[selected["method"].ne(FP16)]), out, args.layer)
        elif kind == "loss":
            loss_plot(load_curves(selected[selected["method"].ne(FP16)]), out)
        else:
            raise ReportError(f"--plot {kind!r}: expected pareto, layers, bitmap or loss")
        print(f"wrote {kind} plot: {out}")
        return 0
    table = pivot(combined, parse_metric(args.metric, combined), args.rows, args.columns, args.digits)
    print(table.render(args.format), end="" if args.format == "csv" else "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return report(args)
    except ReportError as error:
        warn(str(error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
