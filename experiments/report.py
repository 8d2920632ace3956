"""`quantlab-report`: find result.json files under the given directories and print a table.

    quantlab-report outputs/                 # markdown table of every run found
    quantlab-report multirun/ --format csv   # csv (also: latex)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from experiments.results import RESULT_FILE


def find_records(roots: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for root in roots:
        paths = [root] if root.name == RESULT_FILE else sorted(root.rglob(RESULT_FILE))
        for path in paths:
            try:
                found.append((path.parent, json.loads(path.read_text())))
            except (OSError, json.JSONDecodeError) as error:
                print(f"quantlab-report: skipping unreadable {path}: {error}", file=sys.stderr)
    return found


def table(records: list[tuple[Path, dict[str, Any]]]):
    import pandas as pd

    rows = []
    for run_dir, record in records:
        row: dict[str, Any] = {
            "run_dir": str(run_dir), "status": record.get("status"), "model": (record.get("model") or {}).get("name"),
            "method": record.get("method"), "bits": record.get("bits"), "group_size": record.get("group_size"),
            "avg_bits": record.get("avg_bits"),
        }
        for dataset, entry in ((record.get("metrics") or {}).get("ppl") or {}).items():
            row[f"ppl_{dataset}"] = entry.get("value")
            row[f"ppl_{dataset}_ci"] = (
                None if entry.get("ci_low") is None else (entry["ci_high"] - entry["ci_low"]) / 2
            )
        for dataset, entry in ((record.get("baseline") or {}).get("ppl") or {}).items():
            row[f"fp16_ppl_{dataset}"] = entry.get("value")
        row["quantize_s"] = (record.get("timings") or {}).get("quantize_s")
        row["error"] = record.get("error")
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantlab-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("outputs"), Path("multirun")])
    parser.add_argument("--format", choices=["markdown", "csv", "latex"], default="markdown")
    args = parser.parse_args(argv)
    records = find_records([p for p in args.paths if p.exists()])
    if not records:
        print(f"quantlab-report: no {RESULT_FILE} under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 1
    frame = table(records)
    if args.format == "csv":
        print(frame.to_csv(index=False), end="")
    elif args.format == "latex":
        print(frame.to_latex(index=False, float_format="%.3f"))
    else:
        print(frame.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else frame.to_string(index=False))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
