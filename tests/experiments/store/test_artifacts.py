"""Saved quantized models: a run saves one, an eval-only change reloads it instead of quantizing,
`model.source=quantized` evaluates it, and the standalone loader rebuilds the same model."""

import json
from pathlib import Path

import pytest
import torch

from quantlab.experiments.models.quantized import (
    EXACT_FILE,
    QUANT_CONFIG_FILE,
    WEIGHTS_FILE,
    files_are_intact,
    load_formats,
    load_quantized_model,
)
from quantlab.experiments.records.reporting.text import run_rows
from quantlab.experiments.run.cli import load_group_option, run_from_config
from quantlab.experiments.run.schema import validate
from quantlab.experiments.store.cache import read_events
from quantlab.methods.base import ConfigError
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY
from tests.experiments.store.test_shared_inputs import private_cache


def quantized_events(root: Path) -> list[str]:
    return [e["event"] for e in read_events(root) if e["kind"] == "quantized"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = private_cache(tmp_path)
    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(root))
    return root


def ppl(record: dict) -> dict:
    return {k: v["value"] for k, v in record["metrics"]["ppl"].items()}


def test_eval_only_change_reloads_the_saved_model(tmp_path, cache, data_dir):
    gptq = [*TINY, "method=gptq", "save_model=true"]
    first = run_from_config(compose_config(*gptq), tmp_path / "a", progress=False)
    assert quantized_events(cache) == ["compute"]
    saved = tmp_path / "a" / "quantized_model"
    assert files_are_intact(saved) and (saved / EXACT_FILE).is_file()
    assert first["quantized_model"]["source"] == "quantized"
    assert first["quantized_model"]["artifact_bytes"] == (saved / WEIGHTS_FILE).stat().st_size

    # Only evaluation changes (a zero-shot task, more windows, the packed backend): the weights
    # come from the cache.
    second = run_from_config(
        compose_config(*gptq, "eval.tasks=[piqa]", "eval.limit=3", "eval.ppl.max_windows=7", "eval.backend=packed",
                       "eval.kernel=reference"),
        tmp_path / "b", progress=False,
    )
    assert second["metrics"]["tasks"]["piqa"]["n"] == 3
    assert quantized_events(cache) == ["compute", "hit"]
    assert "quantize_s" not in second["timings"] and second["quantized_model"]["source"] == "cache"
    assert second["quantized_model"]["quantize_timings"]["quantize_s"] == first["timings"]["quantize_s"]
    assert second["layers"] == first["layers"] and second["avg_bits"] == first["avg_bits"]
    assert (second["model_bytes"], second["fp16_model_bytes"]) == (first["model_bytes"], first["fp16_model_bytes"])
    assert 0 < second["quantized_model"]["eval_backend"]["weight_bytes"] < 4 * first["fp16_model_bytes"] / 2
    assert second["calib"] == first["calib"]
    assert any("reloaded (cache)" in row["seconds"] for row in run_rows(second))
    backend = second["quantized_model"]["eval_backend"]
    assert backend["backend"] == "packed" and backend["kernels"] == {"reference": len(first["layers"])}
    assert 0 < backend["consistency"]["storage_rel_error"] < 2e-3  # fp16 scales, measured
    assert backend["consistency"]["kernel_rel_error"] < 1e-5  # the reference path computes in fp32

    # Anything that changes the weights is another artifact.
    run_from_config(compose_config(*gptq, "calib.seed=1"), tmp_path / "c", progress=False)
    assert quantized_events(cache) == ["compute", "hit", "compute"]

    # The saved folder, evaluated as a model of its own, gives the run's perplexity exactly.
    again = run_from_config(
        compose_config(*TINY, "model=quantized", f"model.path={saved}"), tmp_path / "d", progress=False
    )
    assert ppl(again) == ppl(first) and again["method"] == "gptq" and again["layers"] == first["layers"]
    assert again["quantized_model"]["source"] == "model.path"


def test_standalone_loader_rebuilds_the_model(tmp_path, cache, data_dir):
    record = run_from_config(compose_config(*TINY, "save_model=true"), tmp_path / "a", progress=False)
    saved = tmp_path / "a" / "quantized_model"
    config = json.loads((saved / QUANT_CONFIG_FILE).read_text())
    assert config["method"] == "rtn" and len(config["layers"]) == len(record["layers"])
    fake, tokenizer, _ = load_quantized_model(saved, backend="fake")
    packed, _, _ = load_quantized_model(saved, backend="packed", kernel="reference")
    assert tokenizer is not None
    assert not any(p.is_meta for p in list(fake.parameters()) + list(fake.buffers()))
    formats = load_formats(saved, exact=True)
    for name, fmt in formats.items():  # the fake model holds the exact dequantized weights
        assert torch.equal(fake.get_submodule(name).weight, fmt.dequantize())
    ids = tokenizer("def f(x):\n    return x + 1\n", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = fake(ids).logits, packed(ids).logits
    assert (a - b).abs().max() / a.abs().max() < 1e-2  # fp16 scales in the packed file


def test_bad_saved_model_paths_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        validate(compose_config(*TINY, "model=quantized", f"model.path={tmp_path}"), load_group_option)
    with pytest.raises(ConfigError, match="needs model.path"):
        validate(compose_config(*TINY, "model.source=quantized"), load_group_option)
    with pytest.raises(ConfigError, match="eval.backend"):
        validate(compose_config(*TINY, "eval.backend=int4"), load_group_option)


@pytest.mark.parametrize("method", [
    ["method=awq"],  # scales folded into the norms
    ["method=qat", "method.steps=3", "method.lr=0.05", "method.optimizer=sgd", "method.train=all_linears_and_norms"],
])
def test_a_cache_hit_brings_back_what_the_method_changed_outside_the_linears(tmp_path, cache, data_dir, method):
    """The artifact stores the norms too; a reload that applied only the linears' formats would
    evaluate AWQ's scaled weights behind unscaled norms (QAT's trained norms: untrained)."""
    overrides = [*TINY, "bits=3", *method]
    first = run_from_config(compose_config(*overrides), tmp_path / "a", progress=False)
    second = run_from_config(compose_config(*overrides), tmp_path / "b", progress=False)
    assert quantized_events(cache) == ["compute", "hit"]
    assert second["quantized_model"]["source"] == "cache"
    assert ppl(second) == ppl(first)
    assert ppl(first) != {k: v["value"] for k, v in first["baseline"]["ppl"].items()}
    if "method=qat" in overrides:  # the loss curve comes back with the artifact
        assert second["fine_tune"] == first["fine_tune"] and len(first["fine_tune"]["curve"]) == 3
