"""`quantlab-report --versus METHOD`: each entry paired window by window with the reference method's."""

import math

import pytest

from quantlab.experiments.records.reporting.cli import main
from quantlab.experiments.records.reporting.records import ReportError, load_runs
from quantlab.experiments.records.reporting.versus import versus_table
from quantlab.experiments.store.cache import atomic_write_json
from tests.experiments.records.reporting.test_report_records import make_record

OURS = [2.0, 2.5, 3.1, 2.2]
GPTQ = [2.1, 2.7, 3.2, 2.5]


def _set_windows(entry, nll):
    entry["metrics"]["ppl"]["wikitext2"]["window_nll"] = list(nll)
    entry["metrics"]["ppl"]["wikitext2"]["n_windows"] = len(nll)


def _write(root, name, record):
    atomic_write_json(root / name / "result.json", record)


@pytest.fixture
def runs_dir(tmp_path):
    slim = make_record("slim_llm", bits=2, group_size=128, ppl={"wikitext2": 30.0},
                       comparisons=[("gptq", {"wikitext2": 40.0})])
    _set_windows(slim, OURS)
    _set_windows(slim["comparisons"][0], GPTQ)
    _write(tmp_path, "slim", slim)
    # VPTQ in a run of its own, at the same nominal bits (its group size is not used).
    vptq = make_record("vptq", bits=2, group_size=-1, ppl={"wikitext2": 35.0}, finished_at="2026-01-02T00:00:00+00:00")
    _set_windows(vptq, [x + 0.05 for x in GPTQ])
    _write(tmp_path, "vptq", vptq)
    return tmp_path


def test_the_ratio_is_the_paired_one_and_a_run_s_own_reference_wins(runs_dir):
    table = versus_table(load_runs([runs_dir]), "gptq", "wikitext2")
    [row] = table.to_dict("records")  # VPTQ's group size differs: not paired by default
    diffs = [a - b for a, b in zip(OURS, GPTQ)]
    assert row["method"] == "slim_llm" and row["same_run"]
    assert row["ppl_ratio"] == pytest.approx(math.exp(sum(diffs) / len(diffs)))
    assert row["ratio_ci_low"] < row["ppl_ratio"] < row["ratio_ci_high"] < 1.0  # every window better
    assert row["n_windows"] == 4


def test_match_on_fewer_keys_pairs_runs_across_directories(runs_dir):
    table = versus_table(load_runs([runs_dir]), "gptq", "wikitext2", ["model", "bits"])
    vptq = table[table["method"].eq("vptq")].iloc[0]
    assert not vptq["same_run"]
    assert vptq["ppl_ratio"] == pytest.approx(math.exp(0.05))
    # The difference is the same on every window: the interval collapses onto the ratio.
    assert vptq["ratio_ci_low"] == pytest.approx(vptq["ppl_ratio"]) == pytest.approx(vptq["ratio_ci_high"])


def test_windows_of_another_protocol_are_not_paired(runs_dir):
    other = make_record("awq", bits=2, group_size=128, ppl={"wikitext2": 33.0})
    _set_windows(other, OURS[:3])  # 3 windows, not the reference's 4
    _write(runs_dir, "awq", other)
    table = versus_table(load_runs([runs_dir]), "gptq", "wikitext2")
    assert "awq" not in set(table["method"])


def test_no_reference_entry_is_a_clear_error(runs_dir):
    with pytest.raises(ReportError, match="no selected entry of method 'owq'"):
        versus_table(load_runs([runs_dir]), "owq", "wikitext2")


def test_cli_prints_the_table(runs_dir, capsys):
    assert main([str(runs_dir), "--versus", "gptq", "--match", "model,bits"]) == 0
    out = capsys.readouterr().out
    assert "PPL ratio (paired, 95%)" in out and "slim_llm" in out and "vptq" in out
    assert main([str(runs_dir), "--versus", "gptq", "--metric", "quantize_s"]) == 1


def test_an_allocated_run_is_paired_with_the_uniform_run_of_its_own_method(tmp_path):
    uniform = make_record("gptq", bits=3, group_size=128, ppl={"wikitext2": 40.0})
    _set_windows(uniform, GPTQ)
    _write(tmp_path, "uniform", uniform)
    allocated = make_record("gptq", bits=3, group_size=128, ppl={"wikitext2": 30.0})
    allocated["allocation"] = {"target_bits": 3.15, "damage": "nll_delta", "solver": "greedy"}
    allocated["config_hash"] = "allocated"  # its config differs (allocation.*): not a duplicate
    _set_windows(allocated, OURS)
    _write(tmp_path, "allocated", allocated)
    [row] = versus_table(load_runs([tmp_path]), "gptq", "wikitext2").to_dict("records")
    assert row["method_options"] == "allocation=3.15:nll_delta:greedy" and row["reference_options"] == ""
    diffs = [a - b for a, b in zip(OURS, GPTQ)]
    assert row["ppl_ratio"] == pytest.approx(math.exp(sum(diffs) / len(diffs)))
