"""Loading run records into a frame: one row per method entry, duplicates, failed and unreadable files.

`make_record` / `write_run` build synthetic records with the fields README's "result.json (schema
version 1)" documents; the other report tests import them.
"""

import json
import math

import pandas as pd
import pytest

from quantlab.experiments.records.record import NOT_FINISHED, config_hash
from quantlab.experiments.records.reporting.records import load_layers, load_runs
from quantlab.experiments.store.cache import atomic_write_json

ROLES = [("self_attn", r) for r in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", r) for r in ("gate_proj", "up_proj", "down_proj")]
BASELINE_PPL = {"wikitext2": 10.0, "c4": 14.0}


def ppl_metric(value, half=0.5, baseline=None, n_windows=40):
    """A metrics.ppl.<dataset> entry: value with a (value - half, value + half) interval, and the
    paired comparison to `baseline` (NLL delta log(value / baseline) ± 0.01)."""
    entry = {"value": value, "ci_low": value - half, "ci_high": value + half, "n_windows": n_windows,
             "n_tokens": n_windows * 2047, "window_nll": [math.log(value)] * 3, "seconds": 1.0, "tokens_per_s": 1e4}
    if baseline is not None:
        delta = math.log(value / baseline)
        entry["vs_baseline"] = {"mean_nll_delta": delta, "ci_low": delta - 0.01, "ci_high": delta + 0.01,
                                "ppl_ratio": value / baseline}
    return entry


def layers(bits, n_blocks=3):
    """Per-linear records: error shrinks with bits, grows with depth and differs by role."""
    return [
        {"name": f"model.layers.{block}.{module}.{role}", "shape": [64, 64], "bits": bits,
         "storage_bits": 64 * 64 * bits, "bits_per_weight": bits + 0.15625,
         "rel_weight_error": 2.0 ** -bits * (1 + 0.1 * block) * (1 + 0.05 * i), "seconds": 0.01, "info": {}}
        for block in range(n_blocks) for i, (module, role) in enumerate(ROLES)
    ]


def method_fields(method, bits, group_size, ppl):
    """The fields a method entry carries (the main method's at top level, a comparison's in its entry)."""
    quantized = method != "fp16"
    return {
        "method": method, "bits": bits, "group_size": group_size,
        "avg_bits": bits + 20 / group_size if quantized else 16.0,
        "model_bytes": int(1e6 * (bits + 20 / group_size) / 16) if quantized else 1_000_000,
        "metrics": {"ppl": {ds: ppl_metric(value, baseline=BASELINE_PPL[ds]) for ds, value in ppl.items()}},
        "timings": {"quantize_s": 3.0, "eval_s": 5.0},
        "layers": layers(bits) if quantized else [],
    }


def make_record(method="rtn", bits=4, group_size=128, ppl=None, status="ok", model="tiny-llama", seed=0,
                calib_dataset="c4", tags=("smollm2",), comparisons=(), expected=None, finished_at="2026-01-01T10:00:00+00:00",
                calib_seed=0, calib_nsamples=128):
    """A schema-1 record. `ppl` maps dataset -> value (default wikitext2 only); `comparisons` are
    (method, ppl) pairs run beside the main method at the same bits and group size; `expected` maps
    dataset -> published value."""
    ppl = ppl or {"wikitext2": 12.0}
    config = {
        "model": {"name": model, "source": "random"}, "method": {"name": method, "bits": bits, "group_size": group_size},
        "calib": {"dataset": calib_dataset, "nsamples": calib_nsamples, "seqlen": 512, "seed": calib_seed},
        "eval": {"ppl": {"datasets": list(ppl), "seqlen": 2048, "max_windows": 40}},
        "bits": bits, "group_size": group_size, "seed": seed, "tags": list(tags), "name": f"{method}-w{bits}",
        "compare_with": [m for m, _ in comparisons],
    }
    record = {
        "schema_version": 1, "status": status, "error": None if status == "ok" else NOT_FINISHED,
        "name": config["name"], "started_at": finished_at, "finished_at": finished_at if status == "ok" else None,
        "config": config, "config_hash": config_hash(config),
        "model": {"name": model, "fingerprint": "random:0", "model_type": "llama", "family": "llama",
                  "n_params": 1_000_000, "dtype": "float32", "device": "cpu"},
        "calib": {"dataset": calib_dataset, "nsamples": calib_nsamples, "seqlen": 512, "seed": calib_seed,
                  "batch_size": 8},
        "eval_protocol": {"ppl": {ds: {"dataset": ds, "seqlen": 2048, "n_windows": 40, "n_windows_total": 148}
                                  for ds in ppl}},
        "baseline": {"ppl": {ds: ppl_metric(BASELINE_PPL[ds]) for ds in ppl}},
        "fp16_model_bytes": 1_000_000, "peak_rss_bytes": 1, "peak_gpu_bytes": None,
        "comparisons": [{**method_fields(m, bits, group_size, p), "config": {"name": m}} for m, p in comparisons],
        "seed": seed, "tags": list(tags), "versions": {"python": "3.11"}, "git_commit": "abc",
        **method_fields(method, bits, group_size, ppl),
    }
    if status != "ok":  # a run still going (or killed): the record as written at its start
        record.update(metrics={"ppl": {}}, avg_bits=None, layers=[], comparisons=[], timings={})
    if expected:
        record["expected"] = {"source": "GPTQ paper Table 3", "ppl": expected}
        record["vs_expected"] = {
            ds: {"expected": value, "measured": ppl[ds], "diff": ppl[ds] - value, "rel_diff": ppl[ds] / value - 1,
                 "expected_inside_ci": False} for ds, value in expected.items()
        }
    return record


def write_run(root, name, **fields):
    path = root / name / "result.json"
    atomic_write_json(path, make_record(**fields))
    return path.parent


def test_main_method_and_each_comparison_become_rows(tmp_path):
    write_run(tmp_path, "gptq-w3", method="gptq", bits=3, ppl={"wikitext2": 15.0},
              comparisons=[("rtn", {"wikitext2": 40.0})], expected={"wikitext2": 14.0})
    runs = load_runs([tmp_path])
    assert list(runs["method"]) == ["gptq", "rtn"]
    assert list(runs["entry_index"]) == [0, 1]
    assert list(runs["ppl_wikitext2"]) == [15.0, 40.0]
    assert list(runs["baseline_ppl_wikitext2"]) == [10.0, 10.0]  # both measured against one baseline
    assert runs["run_dir"].nunique() == 1
    # The published value describes the configured method, not the comparison beside it.
    assert runs.loc[0, "expected_ppl_wikitext2"] == 14.0
    assert runs.loc[0, "rel_diff_ppl_wikitext2"] == pytest.approx(15 / 14 - 1)
    assert pd.isna(runs.loc[1, "expected_ppl_wikitext2"])


def test_a_row_holds_every_documented_field(tmp_path):
    run_dir = write_run(tmp_path, "r", method="gptq", bits=4, seed=3, tags=("paper", "smollm2"),
                        ppl={"wikitext2": 12.0, "c4": 16.0})
    row = load_runs([tmp_path]).iloc[0]
    assert row["run_dir"] == str(run_dir.resolve()) and row["status"] == "ok" and pd.isna(row["error"])
    assert (row["model"], row["method"], row["bits"], row["group_size"]) == ("tiny-llama", "gptq", 4, 128)
    assert row["avg_bits"] == pytest.approx(4.15625) and row["model_bytes"] == int(1e6 * 4.15625 / 16)
    assert (row["calib_dataset"], row["calib_nsamples"], row["calib_seqlen"], row["calib_seed"]) == ("c4", 128, 512, 0)
    assert row["seed"] == 3 and len(row["config_hash"]) == 16 and row["tags"] == "paper,smollm2"
    assert (row["ppl_c4"], row["ppl_c4_ci_low"], row["ppl_c4_ci_high"], row["ppl_c4_n_windows"]) == (16.0, 15.5, 16.5, 40)
    assert (row["ppl_c4_seqlen"], row["ppl_c4_n_windows_total"]) == (2048, 148)
    assert row["baseline_ppl_c4"] == 14.0 and row["baseline_ppl_c4_ci_low"] == 13.5
    # The paired interval is on the mean NLL difference; exp maps it onto the PPL ratio.
    assert row["ppl_ratio_c4"] == pytest.approx(16 / 14)
    assert row["ppl_ratio_c4_ci_low"] == pytest.approx(16 / 14 * math.exp(-0.01))
    assert row["ppl_ratio_c4_ci_high"] == pytest.approx(16 / 14 * math.exp(0.01))
    assert (row["quantize_s"], row["eval_s"]) == (3.0, 5.0)


def test_duplicates_keep_the_latest_finished_ok_run(tmp_path, capsys):
    write_run(tmp_path, "old", ppl={"wikitext2": 11.0}, finished_at="2026-01-01T10:00:00+00:00")
    write_run(tmp_path, "new", ppl={"wikitext2": 12.0}, finished_at="2026-01-02T10:00:00+00:00")
    write_run(tmp_path, "rerun-killed", status="failed", finished_at="2026-01-03T10:00:00+00:00")
    write_run(tmp_path, "other-seed", seed=1, ppl={"wikitext2": 13.0})  # another config: not a duplicate
    runs = load_runs([tmp_path])
    assert sorted(runs["ppl_wikitext2"]) == [12.0, 13.0]
    assert runs.attrs["dropped_duplicates"] == 2
    assert "dropped 2 duplicate method entries" in capsys.readouterr().err
    assert len(load_runs([tmp_path], dedupe=False)) == 4


def test_unfinished_runs_are_kept_as_failed(tmp_path):
    write_run(tmp_path, "running", status="failed")
    row = load_runs([tmp_path]).iloc[0]
    assert row["status"] == "failed" and row["error"] == NOT_FINISHED
    assert "ppl_wikitext2" not in row or pd.isna(row["ppl_wikitext2"])


def test_unreadable_files_are_skipped_with_a_warning_naming_them(tmp_path, capsys):
    write_run(tmp_path, "good")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "result.json").write_text('{"status": "ok", "metr')
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "result.json").write_text("[1, 2]")
    runs = load_runs([tmp_path, tmp_path / "missing"])
    assert len(runs) == 1
    err = capsys.readouterr().err
    assert f"skipping unreadable {tmp_path / 'half' / 'result.json'}" in err
    assert f"skipping {tmp_path / 'list' / 'result.json'}: not a run record" in err
    assert "no such file or directory" in err


def test_a_malformed_record_is_skipped_with_a_warning(tmp_path, capsys):
    """A JSON object that is not a run record made quantlab-report raise AttributeError."""
    write_run(tmp_path, "good")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "result.json").write_text('{"status": "ok", "model": "x", "metrics": [1], "calib": 3}')
    runs = load_runs([tmp_path])
    assert len(runs) == 1
    assert f"skipping {tmp_path / 'odd' / 'result.json'}: not a well-formed run record" in capsys.readouterr().err


def test_a_file_found_through_two_paths_is_read_once(tmp_path):
    run_dir = write_run(tmp_path, "a")
    assert len(load_runs([tmp_path, run_dir, run_dir / "result.json"])) == 1


def test_layers_load_with_block_index_and_role(tmp_path):
    write_run(tmp_path, "r", method="gptq", bits=3, comparisons=[("rtn", {"wikitext2": 30.0})])
    runs = load_runs([tmp_path])
    table = load_layers(runs[runs["method"].eq("rtn")])
    assert set(table["method"]) == {"rtn"}
    assert len(table) == 3 * 7 and sorted(table["block"].unique()) == [0, 1, 2]
    assert list(table["role"][:7]) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert table.iloc[0]["rel_weight_error"] == pytest.approx(2.0 ** -3)


def test_the_main_entry_carries_its_activation_and_kv_settings_and_fp16_folds(tmp_path):
    """act / kv sit at the record's top level for the main method: the row shows them (they read as
    off before), and an fp16 entry (group_size None) goes through the replicate fold."""
    from quantlab.experiments.records.reporting.replicates import combine_replicates

    path = write_run(tmp_path, "a8", method="fp16", bits=16, group_size=-1) / "result.json"
    record = json.loads(path.read_text())
    record.update(act_bits=8, act={"bits": 8, "granularity": "per_token", "sym": True, "mode": "dynamic"},
                  kv_bits=4.5, kv={"enabled": True, "bits": 4, "granularity": "per_token", "sym": False,
                                   "group_size": -1, "chunk": 128})
    atomic_write_json(path, record)
    rows = combine_replicates(load_runs([tmp_path]))
    row = rows.iloc[0]
    assert (row["act_bits"], row["act"]) == (8, "per_token sym dynamic")
    assert row["kv_bits"] == 4.5 and row["kv"].startswith("int4 per_token asym") and pd.isna(row["group_size"])
