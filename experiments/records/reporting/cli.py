"""`quantlab-report`: tables and plots of the result.json files under the given paths.

    quantlab-report outputs/multiruns/                       # markdown: model/method/group size by bits
    quantlab-report runs/ --format latex --metric ppl:c4      # booktabs table of C4 perplexity
    quantlab-report runs/ --rows method,bits --columns model  # the GPTQ paper's layout
    quantlab-report runs/ --filter method=gptq,rtn --filter tags=smollm2 --format csv
    quantlab-report runs/ --plot pareto pareto.png            # bits per weight against perplexity
    quantlab-report runs/1_gptq-w3/ --plot layers layers.png  # one run's per-layer weight error
    quantlab-report runs/1_slim/ --plot bitmap bits.png --layer layers.3.mlp  # per-group widths (SliM-LLM)
    quantlab-report runs/ --flat --format csv                 # every method entry, every field
    quantlab-report runs/ --versus gptq                       # each entry against GPTQ, paired per window
    quantlab-report runs/ --versus gptq --match model,bits    # ... at the same nominal bits (VPTQ)
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

from experiments.records.record import RESULT_FILE
from experiments.records.reporting.metrics import parse_metric
from experiments.records.reporting.plots import bitmap_plot, layers_plot, pareto_plot
from experiments.records.reporting.records import FP16, ReportError, load_layers, load_runs, warn
from experiments.records.reporting.replicates import MODES, combine_replicates
from experiments.records.reporting.selection import select
from experiments.records.reporting.tables import DEFAULT_COLUMNS, DEFAULT_ROWS, pivot, render_flat
from experiments.records.reporting.versus import MATCH_KEYS, format_versus, versus_table


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
    parser.add_argument("--plot", nargs=2, metavar=("pareto|layers|bitmap", "OUT.png"),
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


def report(args: argparse.Namespace) -> int:
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
        else:
            raise ReportError(f"--plot {kind!r}: expected pareto, layers or bitmap")
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
