"""`quantlab-export RUN_DIR --format F OUT`: a finished run's quantized model in another format.

RUN_DIR is a run directory (its `quantized_model/`, or the cached copy its result.json names) or
a saved folder itself. OUT is a folder, replaced whole. A format the weights cannot be written in
is refused, with the reason and what would work, before anything is written (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from quantlab.experiments.export.layout import EXPORT_FORMATS, ExportRefused


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="quantlab-export", description="Write a run's saved quantized model in another checkpoint format."
    )
    parser.add_argument("run_dir", help="a run directory or a saved quantized_model folder")
    parser.add_argument("out", help="the folder to write (replaced whole)")
    parser.add_argument("--format", "-f", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--checkpoint-format", default="gptq", choices=("gptq", "gptq_v2"),
                        help="gptq only: v1 (zero-point stored minus one, every loader) or v2 (true zero-points)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from quantlab.experiments.export import export_model

    options = {"checkpoint_format": args.checkpoint_format} if args.format == "gptq" else {}
    try:
        summary = export_model(args.run_dir, args.format, args.out, **options)
    except ExportRefused as error:
        print(f"quantlab-export: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"{summary['n_linears']} quantized linears of a {summary['method']} run written as {args.format}: "
              f"{summary['path']} ({summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s)")
        for note in summary.get("notes", []):
            print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
