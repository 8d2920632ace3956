"""Which entries a report shows: failed runs only on request, `key=value` filters."""

import pytest

from quantlab.experiments.records.reporting.records import ReportError, load_runs
from quantlab.experiments.records.reporting.selection import select
from tests.experiments.records.reporting.test_report_records import write_run


@pytest.fixture
def runs(tmp_path):
    write_run(tmp_path, "gptq-3", method="gptq", bits=3, tags=("paper",), comparisons=[("rtn", {"wikitext2": 40.0})])
    write_run(tmp_path, "gptq-4", method="gptq", bits=4, calib_dataset="wikitext2")
    write_run(tmp_path, "rtn-2", method="rtn", bits=2, calib_dataset=None)
    write_run(tmp_path, "running", method="gptq", bits=2, status="failed")
    return load_runs([tmp_path])


def entries(frame):
    return sorted(zip(frame["method"], frame["bits"]))


def test_failed_runs_are_left_out_unless_asked(runs):
    assert ("gptq", 2) not in entries(select(runs))
    assert ("gptq", 2) in entries(select(runs, include_failed=True))


def test_filters_match_values_lists_tags_and_nulls(runs):
    assert entries(select(runs, ["method=gptq"])) == [("gptq", 3), ("gptq", 4)]
    assert entries(select(runs, ["bits=3,4.0"])) == [("gptq", 3), ("gptq", 4), ("rtn", 3)]
    assert entries(select(runs, ["tags=paper"])) == [("gptq", 3), ("rtn", 3)]
    assert entries(select(runs, ["calib_dataset=none"])) == [("rtn", 2)]
    assert entries(select(runs, ["method=gptq", "calib_dataset=c4"])) == [("gptq", 3)]  # all filters hold


def test_bad_filters_say_what_is_wrong(runs):
    with pytest.raises(ReportError, match="did you mean method"):
        select(runs, ["methd=gptq"])
    with pytest.raises(ReportError, match="expected key=value"):
        select(runs, ["gptq"])
