"""Plain-text tables of run records: the quickstart's closing table and `quantlab-report`'s."""

from __future__ import annotations

from typing import Any

from quantlab.experiments.evaluation.zeroshot.results import stderr_name


def _ppl_cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    value = entry["value"]
    if entry.get("ci_low") is None:
        return f"{value:.3f}"
    half = (entry["ci_high"] - entry["ci_low"]) / 2
    return f"{value:.3f} ± {half:.3f}"


def headline_metric(entry: dict[str, Any]) -> str | None:
    """The number a table shows for a task or group: acc where lm-eval defines it, else its first
    numeric metric (a generative task's `exact_match,<filter>`)."""
    if entry.get("acc") is not None:
        return "acc"
    numbers = [k for k, v in entry.items() if isinstance(v, float) and k != "stderr" and "_stderr" not in k]
    return numbers[0] if numbers else None


def _task_cell(entry: dict[str, Any] | None, metric: str, delta: dict[str, Any] | None = None) -> str:
    """metric ± stderr in %, and for a quantized model its paired difference to the baseline with the
    bootstrap interval, marked * when the interval excludes 0."""
    if not entry or entry.get(metric) is None:
        return "-"
    cell = f"{100 * entry[metric]:.1f}"
    if (stderr := entry.get(stderr_name(metric))) is not None:
        cell += f" ± {100 * stderr:.1f}"
    delta = (delta if metric == "acc" else (delta or {}).get(metric)) or {}
    if delta.get("value") is not None:
        mark = "*" if delta.get("significant") else ""
        cell += f" ({100 * delta['value']:+.1f} [{100 * delta['ci_low']:+.1f}, {100 * delta['ci_high']:+.1f}]{mark})"
    return cell


def _kl_cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean_kl") is None:
        return "-"
    return f"{entry['mean_kl']:.4f} / {100 * entry['top1_agreement']:.1f}%"


def fidelity_columns(record: dict[str, Any], entry: dict[str, Any] | None) -> dict[str, str]:
    """Task accuracy and KL columns of one row: the baseline's when `entry` is None."""
    metrics = (entry or {}).get("metrics") or {}
    baseline = (record.get("baseline") or {}).get("tasks") or {}
    entries = ((record.get("metrics") or {}).get("tasks") or {}) or baseline
    columns = {}
    for task, reference in entries.items():
        if reference.get("group") or (metric := headline_metric(reference)) is None:
            continue  # a group's subtasks stay in the record; the table shows the group
        if entry is None:
            columns[f"{metric} {task}"] = _task_cell(baseline.get(task), metric)
        else:
            columns[f"{metric} {task}"] = _task_cell((metrics.get("tasks") or {}).get(task), metric,
                                                     (metrics.get("delta") or {}).get(task))
    for dataset in ((record.get("metrics") or {}).get("kl") or {}):
        columns[f"KL/top1 {dataset}"] = "0 / 100%" if entry is None else _kl_cell((metrics.get("kl") or {}).get(dataset))
    return columns


def _eval_settings(entry: dict[str, Any]) -> str:
    """What else the entry's evaluated model quantizes: " A8" (activations), " KV4" (KV cache), or ""."""
    act_bits = entry.get("act_bits", 16)
    kv = entry.get("kv") or {}
    return (f" A{act_bits}" if act_bits != 16 else "") + (f" KV{kv['bits']}" if kv.get("enabled") else "")


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
        **fidelity_columns(record, None),
        "size MB": f"{fp_bytes / 1e6:.1f}" if fp_bytes else "-",
        "seconds": f"{timings.get('baseline_eval_s', 0):.1f} (eval{', cached' if not timings.get('baseline_eval_s') else ''})",
    })
    entries = [record] + list(record.get("comparisons") or [])
    for entry in entries:
        evaluated = _eval_settings(entry)
        if entry.get("method") == "fp16" and not evaluated:  # the baseline row already shows it
            continue
        entry_timings = entry.get("timings", timings)
        source = (entry.get("quantized_model") or {}).get("source")
        if source in ("cache", "model.path"):  # not quantized by this run: say where the weights came from
            quantized = f"{entry_timings.get('load_quantized_s', 0):.1f} reloaded ({source})"
        else:
            quantized = f"{entry_timings.get('quantize_s', 0):.1f} quantize"
        rows.append({
            "run": f"{entry.get('method')} W{entry.get('bits')} g{entry.get('group_size')}{evaluated}",
            "bits/weight": f"{entry['avg_bits']:.3f}" if entry.get("avg_bits") else "-",
            **{f"ppl {d}": _ppl_cell(entry["metrics"]["ppl"].get(d)) for d in datasets},
            **fidelity_columns(record, entry),
            "size MB": f"{entry['model_bytes'] / 1e6:.1f}" if entry.get("model_bytes") else "-",
            "seconds": f"{quantized} + {entry_timings.get('eval_s', 0):.1f} eval",
        })
    return rows


def expected_line(record: dict[str, Any]) -> str | None:
    distances = record.get("vs_expected") or {}
    if not distances:
        return None
    parts = [f"{d}: {v['measured']:.3f} vs {v['expected']:.3f} published ({v['rel_diff']:+.1%})" for d, v in distances.items()]
    return f"vs {record['expected']['source']}: " + "; ".join(parts)


PAPER_SEQLEN = 2048
PAPER_CALIBRATION = (128, 2048)


def reduced_protocol_note(record: dict[str, Any]) -> str | None:
    """Say so when the numbers come from a reduced protocol, so they are never mistaken for paper ones."""
    notes = []
    for dataset, protocol in (record.get("eval_protocol") or {}).get("ppl", {}).items():
        if protocol.get("n_windows") != protocol.get("n_windows_total") or protocol.get("seqlen") != PAPER_SEQLEN:
            notes.append(f"{dataset} on {protocol.get('n_windows')} of {protocol.get('n_windows_total')} windows of "
                         f"{protocol.get('seqlen')} tokens (papers: every window of {PAPER_SEQLEN})")
    for task, protocol in (record.get("eval_protocol") or {}).get("tasks", {}).items():
        if protocol.get("limit") is not None or protocol.get("num_fewshot", 0) != 0:
            shots = protocol.get("num_fewshot", 0)
            notes.append(f"{task} on the first {protocol.get('limit')} items, "
                         f"{'the task default' if shots is None else shots}-shot "
                         "(papers: every item, 0-shot)")
    calib = record.get("calib")
    if calib and (calib.get("nsamples"), calib.get("seqlen")) != PAPER_CALIBRATION:
        notes.append(f"calibration {calib.get('nsamples')} x {calib.get('seqlen')} "
                     f"(papers: {PAPER_CALIBRATION[0]} x {PAPER_CALIBRATION[1]})")
    return "reduced protocol: " + "; ".join(notes) if notes else None


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
        if str(calib.get("sampling", "")).startswith("awq"):
            shape = f"{calib.get('nsamples')} lines -> {calib.get('n_sequences', '?')} x {calib.get('seqlen')} (awq sampling)"
        else:
            shape = f"{calib.get('nsamples')} x {calib.get('seqlen')}"
        parts.append(f"calibration: {calib.get('dataset')} {shape}, seed {calib.get('seed')}")
    return "; ".join(parts)
