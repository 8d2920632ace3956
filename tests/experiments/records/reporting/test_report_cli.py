"""`quantlab-report` end to end: paths in, a table, a flat dump or a PNG out, clear failures."""

import io
import json

import pandas as pd

from quantlab.experiments.records.reporting.cli import main as report_main
from quantlab.experiments.store.cache import atomic_write_json
from tests.experiments.records.reporting.test_report_records import write_run


def make_tree(root):
    write_run(root / "a", "gptq-3", method="gptq", bits=3, ppl={"wikitext2": 20.0},
              comparisons=[("rtn", {"wikitext2": 45.0})])
    write_run(root / "sweep", "0", method="gptq", bits=4)
    write_run(root / "sweep", "1", method="gptq", bits=2, status="failed")
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text("{not json")


def test_report_prints_a_pivot_in_each_format(tmp_path, capsys):
    make_tree(tmp_path)
    assert report_main([str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    table = pd.read_csv(io.StringIO(out))
    assert list(table["method"]) == ["fp16", "gptq", "rtn"]
    assert "W2 ppl" not in table.columns  # the failed run is left out
    assert "skipping unreadable" in err and "broken" in err
    assert report_main([str(tmp_path)]) == 0
    assert "| model" in capsys.readouterr().out
    assert report_main([str(tmp_path), "--format", "latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out


def test_report_options_reach_the_table(tmp_path, capsys):
    make_tree(tmp_path)
    args = [str(tmp_path), "--format", "csv", "--rows", "method,bits", "--columns", "model",
            "--filter", "method=gptq", "--include-failed", "--metric", "ppl_ratio:wikitext2", "--digits", "3"]
    assert report_main(args) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index(["method", "bits"])
    assert list(table.index) == [("gptq", "W4"), ("gptq", "W3"), ("gptq", "W2")]
    assert table.loc[("gptq", "W3"), "tiny-llama ppl ratio"] == "2.000 ± 0.020"
    assert table.loc[("gptq", "W2"), "tiny-llama ppl ratio"] == "failed"


def test_flat_lists_every_method_entry(tmp_path, capsys):
    make_tree(tmp_path)
    assert report_main([str(tmp_path), "--flat", "--include-failed", "--format", "csv"]) == 0
    flat = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(flat) == 4  # gptq and rtn of one run, two sweep runs
    assert {"ppl_wikitext2", "baseline_ppl_wikitext2", "ppl_ratio_wikitext2_ci_low"} <= set(flat.columns)


def test_plots_are_written(tmp_path, capsys):
    make_tree(tmp_path)
    for kind, args in [("pareto", []), ("layers", ["--filter", "bits=3"])]:
        out = tmp_path / f"{kind}.png"
        assert report_main([str(tmp_path), "--plot", kind, str(out), *args]) == 0
        assert out.stat().st_size > 0 and f"wrote {kind} plot" in capsys.readouterr().out


def test_report_with_nothing_to_read_says_so(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 1
    assert "no readable result.json" in capsys.readouterr().err
    write_run(tmp_path, "running", status="failed")
    assert report_main([str(tmp_path)]) == 1
    assert "none selected (1 from failed or unfinished runs: --include-failed" in capsys.readouterr().err


def test_report_errors_are_one_clear_line(tmp_path, capsys):
    make_tree(tmp_path)
    assert report_main([str(tmp_path), "--metric", "ppl:c4"]) == 1
    assert "no 'c4' perplexity in the selected runs (datasets: wikitext2)" in capsys.readouterr().err
    assert report_main([str(tmp_path), "--plot", "histogram", "x.png"]) == 1
    assert "expected pareto, layers, bitmap or loss" in capsys.readouterr().err


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "x" / "result.json", {"a": 1})
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["result.json"]
    assert json.loads((tmp_path / "x" / "result.json").read_text()) == {"a": 1}
