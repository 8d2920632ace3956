"""Plain-text tables of run records: the quickstart's closing table and `quantlab-report`'s."""

from __future__ import annotations

from typing import Any


def _ppl_cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    value = entry["value"]
    if entry.get("ci_low") is None:
        return f"{value:.3f}"
    half = (entry["ci_high"] - entry["ci_low"]) / 2
    return f"{value:.3f} ± {half:.3f}"


def run_rows(record: dict[str, Any]) -> list[dict[str, str]]:
    """The baseline row and the method row of one run, for a side-by-side table."""
    datasets = list((record.get("metrics") or {}).get("ppl", {}) or (record.get("baseline") or {}).get("ppl", {}))
    timings = record.get("timings", {})
    rows = []
    baseline = (record.get("baseline") or {}).get("ppl", {})
    fp_bytes = record.get("fp16_model_bytes")
    rows.append({
        "run": "fp16 (baseline)", "bits/weight": "16",
        **{f"ppl {d}": _ppl_cell(baseline.get(d)) for d in datasets},
        "size MB": f"{fp_bytes / 1e6:.1f}" if fp_bytes else "-",
        "seconds": f"{timings.get('baseline_eval_s', 0):.1f} (eval{', cached' if not timings.get('baseline_eval_s') else ''})",
    })
    if record.get("method") != "fp16":
        quant_s = timings.get("quantize_s", 0) + timings.get("calib_data_s", 0)
        rows.append({
            "run": f"{record.get('method')} W{record.get('bits')} g{record.get('group_size')}",
            "bits/weight": f"{record['avg_bits']:.3f}" if record.get("avg_bits") else "-",
            **{f"ppl {d}": _ppl_cell(record["metrics"]["ppl"].get(d)) for d in datasets},
            "size MB": f"{record['model_bytes'] / 1e6:.1f}" if record.get("model_bytes") else "-",
            "seconds": f"{quant_s:.1f} quantize + {timings.get('eval_s', 0):.1f} eval",
        })
    return rows


def render(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no runs)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(row.get(c, "")) for row in rows)) for c in columns}
    line = "| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |"
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"
    body = ["| " + " | ".join(row.get(c, "").ljust(widths[c]) for c in columns) + " |" for row in rows]
    return "\n".join([line, rule, *body])


def protocol_line(record: dict[str, Any]) -> str:
    parts = []
    for dataset, protocol in (record.get("eval_protocol") or {}).get("ppl", {}).items():
        parts.append(
            f"{dataset}: {protocol.get('n_windows')} of {protocol.get('n_windows_total')} windows x "
            f"{protocol.get('seqlen')} tokens"
        )
    calib = record.get("calib")
    if calib:
        parts.append(f"calibration: {calib.get('dataset')} {calib.get('nsamples')} x {calib.get('seqlen')}, seed {calib.get('seed')}")
    return "; ".join(parts)
