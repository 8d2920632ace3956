"""Guidance at the command line: a mistyped key or option is named with the closest valid one
(exit 2), a refused run leaves no run folder behind while a run that fails after it started
keeps its failed record, and each stage of a run logs one line to the console and to the run's
log file (`<run>/quantlab.log`)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import quantlab.experiments.models.loading as loading
import quantlab.experiments.run.cli as cli
import quantlab.experiments.run.flow as flow
from tests.conftest import run_quantlab

BASE = [
    "model=tiny-llama", "method=rtn", "group_size=32", "calib=pydocs", "calib.nsamples=4", "calib.seqlen=64",
    "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=6",
]


class ModelLoaded(BaseException):
    """A refused config got as far as loading the model."""


def _tripwire(*args, **kwargs):
    raise ModelLoaded("the model was loaded")


@pytest.fixture
def quantlab(tmp_path, monkeypatch, capsys):
    """`quantlab ARGS` through its real entry point (`cli.main`) in this process, the model load a
    tripwire: returns (exit status, stderr). Runs write under tmp_path/out."""
    monkeypatch.setattr(flow, "load_model", _tripwire)
    monkeypatch.setattr(loading, "load_model", _tripwire)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def call(*args: str) -> tuple[object, str]:
        out = [f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}"]
        flags = [a for a in args if a.startswith("-")]  # Hydra's flags come before the overrides
        overrides = [a for a in args if not a.startswith("-")]
        monkeypatch.setattr(sys, "argv", ["quantlab", *flags, *BASE, *overrides, *out])
        capsys.readouterr()
        try:
            cli.main()
            status: object = 0
        except SystemExit as error:
            status = error.code
        return status, capsys.readouterr().err

    return call


def _left_behind(tmp_path: Path) -> list[Path]:
    """Files under the output folder, or run folders (Hydra may leave the empty `runs/` itself)."""
    out = tmp_path / "out"
    return sorted(p for p in out.rglob("*") if p.is_file() or p.parent == out / "runs")


def _cache(tmp_path: Path) -> Path:
    """A private cache sharing the converted-model cache (the tokenizer is not converted again)."""
    from quantlab.experiments.store.cache import cache_root

    private = tmp_path / "cache"
    private.mkdir()
    if (cache_root() / "models").exists():
        (private / "models").symlink_to(cache_root() / "models")
    return private


TYPOS = [
    # (overrides, what stderr must say)
    (["method=gptq", "method.act_ordr=true"],
     ["method.act_ordr is not a key of method=gptq; did you mean method.act_order?", "Valid keys of method=gptq:",
      "static_groups"]),
    (["method=gptq", "+method.act_ordr=true"],  # added with +: refused by the typed schema, same words
     ["method.act_ordr is not a key of method=gptq; did you mean method.act_order?", "static_groups"]),
    (["calib.nsample=8"], ["calib.nsample is not a key of calib; did you mean calib.nsamples?", "sampling"]),
    (["eval.ppl.seqln=32"], ["eval.ppl.seqln is not a key of eval.ppl; did you mean eval.ppl.seqlen?",
                             "Valid keys of eval.ppl: batch_size, datasets, max_windows, seqlen"]),
    (["eval.pll.seqlen=32"], ["eval.pll is not a key of eval; did you mean eval.ppl?"]),
    (["method=gtpq"], ["method=gtpq names no option of config group 'method'; did you mean gptq?", "rtn"]),
    (["experiment=smollm2/gptq_vs_rtm"], ["did you mean smollm2/gptq_vs_rtn?"]),
    (["modle=tiny-opt"], ["unknown top-level key 'modle'", "modle -> model"]),
    (["method.per_tensor=true"],  # a real knob of rtn that conf/method/rtn.yaml does not list
     ["method.per_tensor is a knob of method=rtn that its config file does not list", "+method.per_tensor=VALUE"]),
]


@pytest.mark.parametrize("overrides, needles", TYPOS, ids=[" ".join(o) for o, _ in TYPOS])
def test_a_typo_names_the_closest_valid_key_or_option(overrides, needles, quantlab, tmp_path):
    status, err = quantlab(*overrides)
    assert status == 2, err
    assert err.startswith("quantlab: config error: "), err
    for needle in needles:
        assert needle in err, err
    assert "not in struct" not in err and "Traceback" not in err, err
    assert _left_behind(tmp_path) == [], "a refused run left files behind"


@pytest.mark.parametrize("bad", [["bits=1"], ["eval.ppl.seqlen=0"], ["eval.ppl.datasets=[wikitext2]", "paths.data_dir=NOWHERE"]],
                         ids=["value", "range", "preflight"])
def test_a_refused_run_leaves_no_run_folder(bad, quantlab, tmp_path):
    """Hydra makes the run directory before quantlab checks the config; a refusal removes it."""
    bad = [b.replace("NOWHERE", str(tmp_path / "no-data")) for b in bad]
    status, err = quantlab(*bad)
    assert status == 2, err
    assert "error: " in err and "the run's record" not in err
    assert _left_behind(tmp_path) == [], "the refused run left its folder"


def test_a_refusal_leaves_a_folder_that_was_there_before_alone(quantlab, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    status, err = quantlab("bits=1", f"hydra.run.dir={mine}")
    assert status == 2, err
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "result.json").exists()


def test_a_sweep_names_the_closest_option_for_each_invalid_job(quantlab, tmp_path):
    status, err = quantlab("-m", "method=rtn,gtpq", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert status == 2, err
    assert "1 of 2 jobs of the sweep are invalid" in err
    assert "method=gtpq names no option of config group 'method'; did you mean gptq?" in err
    assert not list(tmp_path.rglob("result.json"))


STAGES = [
    "model tiny-llama loaded (", "baseline pydocs: ppl ", "calibration: 4 sequences x 64 tokens of pydocs (seed 0)",
    "gptq: block 1/2 (model.layers.0): ", "gptq: block 2/2 (model.layers.1): ", "gptq pydocs: ppl ",
    "record written: ",
]


def test_each_stage_logs_one_line_to_the_console_and_the_run_log(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    done = run_quantlab(*BASE, "method=gptq", "bits=4", f"hydra.run.dir={run_dir}", f"paths.cache_dir={_cache(tmp_path)}")
    assert done.returncode == 0, done.stderr
    log = (run_dir / "quantlab.log").read_text().splitlines()
    record = json.loads((run_dir / "result.json").read_text())
    for stage in STAGES:
        assert sum(stage in line for line in log) == 1, (stage, log)
        assert sum(stage in line for line in done.stdout.splitlines()) == 1, (stage, done.stdout)
    blocks = [line for line in log if "gptq: block " in line]
    losses = [[r["info"]["loss"] for r in record["layers"] if r["name"].startswith(f"model.layers.{i}.")]
              for i in range(2)]
    for line, block in zip(blocks, losses):  # the line's mean is the record's per-layer losses
        assert f"mean loss {sum(block) / len(block):.4g} over 7 linears" in line, line
    ppl = record["metrics"]["ppl"]["pydocs"]
    [evaluated] = [line for line in log if "gptq pydocs: ppl " in line]
    assert f"± {(ppl['ci_high'] - ppl['ci_low']) / 2:.2f}" in evaluated and "(6 windows," in evaluated
    assert f"record written: {run_dir / 'result.json'} (status ok)" in log[-1]
    assert "perplexity:" not in done.stderr and "blocks:" not in done.stderr  # no bars in a pipe


def test_the_perplexity_pass_shows_a_progress_bar_over_its_windows(tmp_path, data_dir, capsys, monkeypatch):
    """On a terminal (`progress`), beside the block driver's bar."""
    from quantlab.experiments.run.cli import run_from_config
    from tests.conftest import compose_config

    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(_cache(tmp_path)))
    run_from_config(compose_config(*BASE), tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "rtn: blocks: 100%" in err and "2/2" in err
    # the bar counts windows; it is cleared when done (leave=False), and tqdm draws at most every
    # 0.1 s, so which states show (100% or not) depends on the machine's speed
    bars = [part for part in err.split("\r") if part.startswith("perplexity:")]
    assert bars and all(re.search(r"\| [0-6]/6 \[", bar) for bar in bars if "it/s]" in bar or "?it/s]" in bar), err


def test_a_run_that_fails_after_it_started_keeps_its_failed_record(tmp_path, data_dir):
    """Too few tokens for one window is found after the model loads: the run had started, so its
    folder stays, with the failed record and the log that says so."""
    text = tmp_path / "data" / "wikitext2"
    text.mkdir(parents=True)
    (text / "wiki.test.raw").write_text("a" * 300)
    run_dir = tmp_path / "run"
    done = run_quantlab(*BASE, "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=128", f"paths.data_dir={tmp_path / 'data'}",
                        f"hydra.run.dir={run_dir}", f"paths.cache_dir={_cache(tmp_path)}")
    assert done.returncode == 1 and "fewer than seqlen=128" in done.stderr, done.stderr
    assert json.loads((run_dir / "result.json").read_text())["status"] == "failed"
    log = (run_dir / "quantlab.log").read_text()
    assert "model tiny-llama loaded (" in log and "(status failed)" in log
