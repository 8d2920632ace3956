"""End to end on a tiny random model: the record, its schema, the cached baseline, failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantlab.experiments.records.record import NOT_FINISHED, SCHEMA_VERSION
from quantlab.experiments.run.cli import run_from_config
from quantlab.methods.base import ConfigError
from tests.conftest import compose_config

TINY = [
    "model=tiny-llama", "method=rtn", "bits=4", "group_size=32", "calib=pydocs", "calib.nsamples=4",
    "calib.seqlen=64", "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=6",
]
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private baseline cache, sharing the converted-model cache (so no re-conversion)."""
    from quantlab.experiments.store.cache import cache_root

    shared = cache_root()
    private = tmp_path / "cache"
    (private).mkdir()
    if (shared / "models").exists():
        (private / "models").symlink_to(shared / "models")
    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(private))
    return private


def test_record_has_the_documented_schema(tmp_path, isolated_cache):
    record = run_from_config(compose_config(*TINY), tmp_path / "run", progress=False)
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["error"] is None
    for key in (
        "schema_version", "config", "config_hash", "model", "method", "bits", "group_size", "calib",
        "eval_protocol", "metrics", "baseline", "avg_bits", "model_bytes", "timings", "peak_rss_bytes",
        "layers", "versions", "git_commit",
    ):
        assert key in on_disk, key
    assert on_disk["schema_version"] == SCHEMA_VERSION
    ppl = on_disk["metrics"]["ppl"]["pydocs"]
    assert {"value", "ci_low", "ci_high", "n_tokens"} <= set(ppl)
    assert ppl["n_tokens"] == 6 * 63
    assert on_disk["baseline"]["ppl"]["pydocs"]["value"] > 0
    assert on_disk["eval_protocol"]["ppl"]["pydocs"]["seqlen"] == 64
    for key in ("load_s", "quantize_s", "eval_s"):
        assert on_disk["timings"][key] >= 0
    # bits: 64 x 64 attention and 64 -> 160 / 160 -> 64 MLP, g32 with fp16 scale + 4-bit zero
    layers = on_disk["layers"]
    assert len(layers) == 14 and {"name", "bits", "rel_weight_error", "seconds"} <= set(layers[0])
    total_bits = sum(layer["storage_bits"] for layer in layers)
    numel = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    assert on_disk["avg_bits"] == pytest.approx(total_bits / numel)
    assert on_disk["avg_bits"] == pytest.approx(4 + 20 / 32)
    assert record["config_hash"] == on_disk["config_hash"]


def test_baseline_is_computed_once_per_model_and_protocol(tmp_path, isolated_cache):
    first = run_from_config(compose_config(*TINY), tmp_path / "a", progress=False)
    second = run_from_config(compose_config(*TINY, "bits=3"), tmp_path / "b", progress=False)
    assert first["timings"]["baseline_eval_s"] > 0
    assert second["timings"]["baseline_eval_s"] == 0
    assert second["baseline"]["ppl"]["pydocs"]["value"] == first["baseline"]["ppl"]["pydocs"]["value"]
    assert second["metrics"]["ppl"]["pydocs"]["value"] != first["metrics"]["ppl"]["pydocs"]["value"]


def test_fp16_run_reports_the_baseline_itself(tmp_path, isolated_cache):
    record = run_from_config(compose_config(*TINY, "method=fp16"), tmp_path / "fp", progress=False)
    assert record["layers"] == [] and record["avg_bits"] == 16.0
    assert record["metrics"]["ppl"]["pydocs"]["value"] == record["baseline"]["ppl"]["pydocs"]["value"]


def test_a_refused_config_writes_no_record_unless_asked(tmp_path):
    """A refusal is a message, not a run; a sweep's job asks for its failed record (the index lists it)."""
    with pytest.raises(ConfigError):
        run_from_config(compose_config(*TINY, "bits=1"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError):
        run_from_config(compose_config(*TINY, "bits=1"), tmp_path / "job", progress=False, record_refusal=True)
    record = json.loads((tmp_path / "job" / "result.json").read_text())
    assert record["status"] == "failed" and "bits=1" in record["error"]


def _cli(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "quantlab.experiments.run.cli", *overrides, f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_record(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never wrote its initial record"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_killed_midway_leaves_a_failed_record(tmp_path, sig, data_dir):
    # An uncached full-WikiText-2 baseline on SmolLM2 (minutes of work) keeps the run busy: it
    # is surely midway when the signal comes, on any machine.
    proc = _cli(
        tmp_path, "model=smollm2-135m", "method=rtn", "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=512",
        "eval.ppl.max_windows=null", f"paths.cache_dir={tmp_path / 'cache'}",
    )
    result = tmp_path / "result.json"
    _wait_for_record(result, proc)
    time.sleep(2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    record = json.loads(result.read_text())
    assert record["status"] == "failed"
    if sig == signal.SIGTERM:
        assert "SIGTERM" in record["error"] and record["finished_at"]
    else:
        assert record["error"] == NOT_FINISHED


def test_cli_config_error_exits_2_with_the_message(tmp_path):
    proc = _cli(tmp_path, "model=tiny-llama", "bits=9")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "cannot quantize to bits=9" in err
    assert not (tmp_path / "result.json").exists()  # refused: no record (tests/experiments/run/test_guidance.py)


def test_compare_with_runs_other_methods_on_the_same_windows(tmp_path, isolated_cache):
    record = run_from_config(
        compose_config(*TINY, "method=gptq", "compare_with=[rtn]"), tmp_path / "cmp", progress=False
    )
    assert record["method"] == "gptq" and record["calib"]["nsamples"] == 4
    [rtn] = record["comparisons"]
    assert rtn["method"] == "rtn" and rtn["bits"] == 4 and rtn["group_size"] == 32
    assert rtn["metrics"]["ppl"]["pydocs"]["n_windows"] == record["metrics"]["ppl"]["pydocs"]["n_windows"]
    assert rtn["metrics"]["ppl"]["pydocs"]["value"] != record["metrics"]["ppl"]["pydocs"]["value"]
    assert len(rtn["layers"]) == 14


def test_compare_with_an_unknown_method_fails_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="'awq-ish' names no option of config group 'method'"):
        run_from_config(compose_config(*TINY, "compare_with=[awq-ish]"), tmp_path / "bad", progress=False)


def test_expected_values_give_the_distance_from_the_paper(tmp_path, isolated_cache):
    record = run_from_config(
        compose_config(*TINY, "+expected.source=a paper", "+expected.ppl.pydocs=100.0"), tmp_path / "exp",
        progress=False,
    )
    distance = record["vs_expected"]["pydocs"]
    measured = record["metrics"]["ppl"]["pydocs"]["value"]
    assert distance["expected"] == 100.0 and distance["diff"] == pytest.approx(measured - 100.0)
    assert distance["rel_diff"] == pytest.approx(measured / 100.0 - 1)


def test_expected_value_for_a_dataset_not_evaluated_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected.ppl names 'wikitext2'"):
        run_from_config(
            compose_config(*TINY, "+expected.source=x", "+expected.ppl.wikitext2=5.0"), tmp_path / "bad", progress=False
        )


def test_sweep_run_directories_stay_flat_when_an_override_holds_a_slash():
    """`experiment=smollm2/gptq_vs_rtn` in a sweep names one directory, not two nested ones."""
    from omegaconf import OmegaConf

    import quantlab.experiments.run.cli  # noqa: F401  registers the path_safe resolver

    resolve = OmegaConf.create({"d": "${path_safe:'experiment=smollm2/gptq_vs_rtn,method=awq'}"})
    assert resolve.d == "experiment=smollm2-gptq_vs_rtn,method=awq"
    assert "path_safe" in (Path(quantlab.experiments.run.cli.CONF_DIR) / "config.yaml").read_text()
