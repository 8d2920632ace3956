"""Pivot tables: cell values and intervals, the baseline row, published values, the three formats."""

import io
import re

import pandas as pd
import pytest

from quantlab.experiments.records.reporting.metrics import parse_metric
from quantlab.experiments.records.reporting.records import ReportError, load_runs
from quantlab.experiments.records.reporting.selection import select
from quantlab.experiments.records.reporting.tables import format_interval, format_number, pivot
from tests.experiments.records.reporting.test_report_records import write_run


@pytest.fixture
def sweep(tmp_path):
    """GPTQ at W3 and W4 with RTN beside each, wikitext2 and c4, plus one unfinished run."""
    write_run(tmp_path, "gptq-3", method="gptq", bits=3, ppl={"wikitext2": 15.0, "c4": 19.0},
              comparisons=[("rtn", {"wikitext2": 40.0, "c4": 45.0})])
    write_run(tmp_path, "gptq-4", method="gptq", bits=4, ppl={"wikitext2": 11.0, "c4": 15.5},
              comparisons=[("rtn", {"wikitext2": 12.5, "c4": 16.5})])
    write_run(tmp_path, "gptq-2", method="gptq", bits=2, status="failed")
    return load_runs([tmp_path])


def table_of(runs, metric=None, **kwargs):
    return pivot(runs, parse_metric(metric, runs), **kwargs)


def test_cells_hold_value_half_interval_and_bits_per_weight(sweep):
    table = table_of(select(sweep)).frame
    assert list(table.index) == [("tiny-llama", "fp16", "-"), ("tiny-llama", "gptq", "128"), ("tiny-llama", "rtn", "128")]
    assert list(dict.fromkeys(label for label, _ in table.columns)) == ["W16", "W4", "W3"]  # precision high to low
    assert table.loc[("tiny-llama", "gptq", "128"), ("W3", "ppl")] == "15.00 ± 0.50"
    assert table.loc[("tiny-llama", "rtn", "128"), ("W4", "ppl")] == "12.50 ± 0.50"
    assert table.loc[("tiny-llama", "gptq", "128"), ("W3", "bpw")] == "3.16"  # 3 + 20 / 128
    # The baseline is its own row, at 16 bits, once however many runs repeat it.
    assert table.loc[("tiny-llama", "fp16", "-"), ("W16", "ppl")] == "10.00 ± 0.50"
    assert table.loc[("tiny-llama", "fp16", "-"), ("W16", "bpw")] == "16.00"
    assert table.loc[("tiny-llama", "fp16", "-"), ("W4", "ppl")] == "-"


def test_metric_picks_the_dataset_or_the_paired_ratio(sweep):
    runs = select(sweep)
    assert parse_metric(None, runs).dataset == "wikitext2"  # the first dataset found
    c4 = table_of(runs, "ppl:c4").frame
    assert c4.loc[("tiny-llama", "gptq", "128"), ("W3", "ppl")] == "19.00 ± 0.50"
    assert c4.loc[("tiny-llama", "fp16", "-"), ("W16", "ppl")] == "14.00 ± 0.50"
    ratio = table_of(runs, "ppl_ratio:wikitext2").frame
    assert ratio.loc[("tiny-llama", "gptq", "128"), ("W3", "ppl ratio")] == format_interval(
        1.5, 1.5 * 0.99005, 1.5 * 1.01005, 2)
    with pytest.raises(ReportError, match="datasets: wikitext2, c4"):
        parse_metric("ppl:ptb", runs)


def test_rows_and_columns_can_be_any_keys(sweep):
    table = table_of(select(sweep), rows=["method", "bits"], columns=["model"]).frame
    assert list(table.index) == [("fp16", "W16"), ("gptq", "W4"), ("gptq", "W3"), ("rtn", "W4"), ("rtn", "W3")]
    assert table.loc[("rtn", "W3"), ("tiny-llama", "ppl")] == "40.00 ± 0.50"
    with pytest.raises(ReportError, match="no column 'modle'"):
        table_of(select(sweep), rows=["modle"])


def test_failed_runs_show_only_when_included(sweep):
    assert ("W2", "ppl") not in table_of(select(sweep)).frame.columns
    table = table_of(select(sweep, include_failed=True)).frame
    assert table.loc[("tiny-llama", "gptq", "128"), ("W2", "ppl")] == "failed"


def test_paper_runs_show_the_published_value_and_our_delta(tmp_path):
    write_run(tmp_path, "paper", method="gptq", bits=3, ppl={"wikitext2": 15.3}, expected={"wikitext2": 15.0},
              comparisons=[("rtn", {"wikitext2": 40.0})])
    table = table_of(load_runs([tmp_path]))
    row = table.frame.loc[("tiny-llama", "gptq", "128")]
    assert (row[("W3", "published")], row[("W3", "Δ vs published")]) == ("15.00", "+2.0%")
    assert table.frame.loc[("tiny-llama", "rtn", "128"), ("W3", "published")] == "-"
    assert any("GPTQ paper Table 3" in note for note in table.notes)


def test_a_cell_with_several_runs_shows_the_latest_and_warns(tmp_path, capsys):
    write_run(tmp_path, "seed0", seed=0, ppl={"wikitext2": 12.0}, finished_at="2026-01-01T10:00:00+00:00")
    write_run(tmp_path, "seed1", seed=1, ppl={"wikitext2": 13.0}, finished_at="2026-01-02T10:00:00+00:00")
    runs = load_runs([tmp_path])
    assert table_of(runs).frame.loc[("tiny-llama", "rtn", "128"), ("W4", "ppl")] == "13.00 ± 0.50"
    assert "1 table cell(s) hold several runs" in capsys.readouterr().err
    by_seed = table_of(runs, rows=["model", "method", "seed"]).frame
    assert by_seed.loc[("tiny-llama", "rtn", "0"), ("W4", "ppl")] == "12.00 ± 0.50"


def test_latex_is_booktabs_with_everything_escaped(tmp_path):
    write_run(tmp_path, "r", model="tiny_llama", method="gptq", bits=3, expected={"wikitext2": 11.0})
    text = table_of(load_runs([tmp_path])).render("latex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){6-9}", r"\multicolumn{4}{c}{W3}"):
        assert rule in text
    assert r"tiny\_llama" in text and r"group\_size" in text
    assert r"12.00 $\pm$ 0.50" in text and r"+9.1\%" in text and r"$\Delta$" in text
    # Outside the two symbols we typeset as math, no character LaTeX would read as markup.
    assert re.search(r"(?<!\\)[_%#$]", text.replace(r"$\pm$", "").replace(r"$\Delta$", "")) is None
    assert "±" not in text and "Δ" not in text


def test_csv_parses_back_and_markdown_carries_the_notes(sweep):
    table = table_of(select(sweep))
    parsed = pd.read_csv(io.StringIO(table.render("csv")))
    assert list(parsed.columns[:4]) == ["model", "method", "group_size", "W16 ppl"]
    assert parsed.set_index("method").loc["gptq", "W3 ppl"] == "15.00 ± 0.50"
    assert len(parsed) == 3
    markdown = table.render("markdown")
    assert markdown.startswith("| model") and "| W3 ppl" in markdown
    assert "protocol: wikitext2: 40 of 148 windows x 2048 tokens" in markdown


def test_numbers_stay_readable_at_every_scale():
    assert format_number(12.3456, 2) == "12.35"
    assert format_number(3550157.5, 2) == "3.55e+06"
    assert format_interval(3550157.5, 2687758.5, 4689267.4, 2) == "3.55e+06 ± 1.00e+06"
    assert format_interval(12.0, None, None, 2) == "12.00"


def test_method_variants_get_their_own_rows(tmp_path):
    """The literature's two RTNs are different rows, never one cell."""
    from quantlab.experiments.records.record import config_hash
    from quantlab.experiments.store.cache import atomic_write_json
    from tests.experiments.records.reporting.test_report_records import make_record

    for zero_in_range, ppl in ((True, 30.0), (False, 20.0)):
        record = make_record(method="rtn", bits=4, ppl={"wikitext2": ppl})
        record["config"]["method"]["zero_in_range"] = zero_in_range
        record["config_hash"] = config_hash(record["config"])
        atomic_write_json(tmp_path / f"rtn-{zero_in_range}" / "result.json", record)
    runs = load_runs([tmp_path])
    table = pivot(runs, parse_metric("ppl:wikitext2", runs)).frame
    assert sorted(i[2] for i in table.index if i[1] == "rtn") == ["", "zero_in_range=True"]
