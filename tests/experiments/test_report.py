import json

from experiments import report
from experiments.cache import atomic_write_json


def fake_record(status="ok", method="rtn", bits=4, ppl=12.5):
    return {
        "status": status, "model": {"name": "tiny"}, "method": method, "bits": bits, "group_size": 128,
        "avg_bits": bits + 0.156, "metrics": {"ppl": {"wikitext2": {"value": ppl, "ci_low": ppl - 1, "ci_high": ppl + 1}}},
        "baseline": {"ppl": {"wikitext2": {"value": 10.0}}}, "timings": {"quantize_s": 3.0},
        "error": None if status == "ok" else "boom",
    }


def test_report_finds_every_run_and_renders_each_format(tmp_path, capsys):
    atomic_write_json(tmp_path / "a" / "result.json", fake_record(bits=3, ppl=20.0))
    atomic_write_json(tmp_path / "sweep" / "0" / "result.json", fake_record(bits=4))
    atomic_write_json(tmp_path / "sweep" / "1" / "result.json", fake_record(status="failed"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")

    assert report.main([str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 4  # header + 3 readable runs
    assert "ppl_wikitext2" in lines[0] and "fp16_ppl_wikitext2" in lines[0]
    assert "skipping unreadable" in err
    assert report.main([str(tmp_path)]) == 0
    assert "| status" in capsys.readouterr().out
    assert report.main([str(tmp_path), "--format", "latex"]) == 0
    assert "\\begin{tabular}" in capsys.readouterr().out


def test_report_with_nothing_to_read_says_so(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "no result.json" in capsys.readouterr().err


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "x" / "result.json", {"a": 1})
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["result.json"]
    assert json.loads((tmp_path / "x" / "result.json").read_text()) == {"a": 1}
