"""What runs share through the cache gives exactly what computing it afresh gives, keyed so that
anything that changes the result makes another entry."""

import copy
from pathlib import Path

import torch

from quantlab.experiments.data.calibration import CalibrationSpec, calibration_set
from quantlab.experiments.data.protocols import eval_windows
from quantlab.experiments.run.cli import run_from_config
from quantlab.experiments.run.pipeline import capture_block_inputs, quantize_model
from quantlab.experiments.store.cache import cache_root, computations, read_events
from quantlab.experiments.store.shared_inputs import (
    cached_block_inputs,
    cached_calibration_set,
    cached_eval_windows,
    tokenizer_fingerprint,
)
from quantlab.methods import get_method_class
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY


def private_cache(tmp_path: Path) -> Path:
    """An empty cache whose converted models are the shared ones (no 30 s GGUF conversion per
    test; a conversion made here lands in the shared cache, under its lock)."""
    shared = cache_root() / "models"
    shared.mkdir(parents=True, exist_ok=True)
    private = tmp_path / "cache"
    private.mkdir()
    (private / "models").symlink_to(shared)
    return private


SHARED_KINDS = ("eval_windows", "baseline", "calibration", "block_inputs")


def kinds(root: Path) -> dict[str, int]:
    """Computations per kind of the entries a perplexity run shares (other kinds, such as a KL
    summary an eval option adds, are not counted here)."""
    counts: dict[str, int] = {}
    for (kind, _), n in computations(root).items():
        if kind in SHARED_KINDS:
            counts[kind] = counts.get(kind, 0) + n
    return counts


def test_cached_windows_and_calibration_equal_fresh_ones(tmp_path, tiny_llama, data_dir):
    root, tokenizer = private_cache(tmp_path), tiny_llama.tokenizer
    for _ in range(2):
        windows = cached_eval_windows("pydocs", tokenizer, 64, 5, root)
        ids, fingerprint, key = cached_calibration_set(CalibrationSpec("pydocs", 4, 64, 0), tokenizer, root)
    fresh = eval_windows("pydocs", tokenizer, 64, 5)
    assert torch.equal(windows.input_ids, fresh.input_ids) and windows.protocol == fresh.protocol
    fresh_ids, fresh_fingerprint = calibration_set(CalibrationSpec("pydocs", 4, 64, 0), tokenizer)
    assert torch.equal(ids, fresh_ids) and fingerprint == fresh_fingerprint
    assert key["tokenizer"] == tokenizer_fingerprint(tokenizer)
    assert kinds(root) == {"eval_windows": 1, "calibration": 1}
    cached_eval_windows("pydocs", tokenizer, 32, 5, root)  # another seqlen, another entry
    cached_calibration_set(CalibrationSpec("pydocs", 4, 64, 1), tokenizer, root)  # another seed
    assert kinds(root) == {"eval_windows": 2, "calibration": 2}


def test_cached_block_inputs_quantize_exactly_like_captured_ones(tmp_path, tiny_llama, data_dir):
    root = private_cache(tmp_path)
    ids, _, key = cached_calibration_set(CalibrationSpec("pydocs", 4, 64, 0), tiny_llama.tokenizer, root)
    device = torch.device("cpu")
    captured = capture_block_inputs(tiny_llama.model, tiny_llama.architecture, ids, device, 2)
    computed, _ = cached_block_inputs(tiny_llama, ids, key, 2, root)
    cached, _ = cached_block_inputs(tiny_llama, ids, key, 2, root)
    assert kinds(root) == {"calibration": 1, "block_inputs": 1}
    for inputs in (computed, cached):
        assert all(torch.equal(a, b) for a, b in zip(inputs.hidden, captured.hidden))
        assert inputs.kwargs[0].keys() == captured.kwargs[0].keys()
    cached_block_inputs(tiny_llama, ids, key, 4, root)  # another batch size, another entry
    assert kinds(root)["block_inputs"] == 2

    method_config = get_method_class("gptq").config_class(bits=4, group_size=32)
    reports = []
    for block_inputs in (None, cached):
        model = copy.deepcopy(tiny_llama.model)  # quantized in place: each run gets a fresh copy
        method = get_method_class("gptq")(method_config)
        reports.append(
            quantize_model(model, tiny_llama.architecture, method, ids, device, 2, False, block_inputs)
        )
    assert [r.rel_weight_error for r in reports[0].layers] == [r.rel_weight_error for r in reports[1].layers]


def test_runs_share_entries_and_block_inputs_can_stay_out(tmp_path, monkeypatch, data_dir):
    root = private_cache(tmp_path)
    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(root))
    gptq = [*TINY, "method=gptq"]
    first = run_from_config(compose_config(*gptq), tmp_path / "a", progress=False)
    second = run_from_config(
        compose_config(*gptq, "bits=3", "paths.cache_block_inputs=false"), tmp_path / "b", progress=False
    )
    assert kinds(root) == {"eval_windows": 1, "baseline": 1, "calibration": 1, "block_inputs": 1}
    events = [(e["kind"], e["event"]) for e in read_events(root) if e["kind"] != "models"]
    assert events.count(("block_inputs", "compute")) == 1 and ("block_inputs", "hit") not in events, (
        "paths.cache_block_inputs=false neither reads nor writes block 0's inputs"
    )
    assert events.count(("calibration", "hit")) == 1 and events.count(("baseline", "hit")) == 1
    assert first["calib"] == second["calib"] and first["eval_protocol"] == second["eval_protocol"]
    assert second["timings"]["baseline_eval_s"] == 0 and second["metrics"] != first["metrics"]
