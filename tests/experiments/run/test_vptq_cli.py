"""method=vptq end to end on the tiny random llama: avg_bits from the codebook format, and the saved
model reloads to the same perplexity (the centroids are fp16 before the pass: no sidecar needed)."""

import pytest

from quantlab.experiments.models.quantized import EXACT_FILE, WEIGHTS_FILE, files_are_intact, load_formats
from quantlab.experiments.run.cli import run_from_config
from quantlab.kernels import CodebookWeight
from quantlab.methods.vptq import VPTQConfig, layer_bits
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY
from tests.experiments.store.test_artifacts import cache, ppl  # noqa: F401  (fixture)

# 2 bits of indices (v4 k256 would be too many centroids for 64-wide layers): v3 k64, few iterations.
VPTQ_TINY = [
    *[o for o in TINY if not o.startswith(("method=", "bits=", "eval.ppl.max_windows"))],
    "method=vptq", "bits=2", "eval.ppl.max_windows=4",
    "method.vector_len=3", "method.centroids=64", "method.kmeans_iters=5",
]


def test_tiny_llama_run_counts_the_codebooks_and_its_saved_model_reloads(tmp_path, cache, data_dir):  # noqa: F811
    record = run_from_config(compose_config(*VPTQ_TINY, "save_model=true"), tmp_path / "a", progress=False)
    assert record["status"] == "ok" and record["method"] == "vptq"
    layers = record["layers"]
    assert len(layers) == 14
    cfg = VPTQConfig(bits=2, vector_len=3, centroids=64, kmeans_iters=5)
    numel = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    expected = sum(layer_bits(*layer["shape"], cfg)["true"] * layer["shape"][0] * layer["shape"][1] for layer in layers)
    assert record["avg_bits"] == pytest.approx(expected / numel)
    assert record["avg_bits"] == pytest.approx(sum(layer["storage_bits"] for layer in layers) / numel)
    for layer in layers:
        info = layer["info"]
        assert info["true_bits"] > info["paper_bits"] > info["index_bits"] >= 2.0
        assert 0 < info["proxy_error"] < info["proxy_error_kmeans"] and 0 <= info["kmeans_share"] <= 1
    saved = tmp_path / "a" / "quantized_model"
    assert files_are_intact(saved) and not (saved / EXACT_FILE).exists()  # nothing fp32 to restore
    assert (saved / WEIGHTS_FILE).is_file()
    assert all(isinstance(fmt, CodebookWeight) for fmt in load_formats(saved).values())
    again = run_from_config(
        compose_config(*VPTQ_TINY, "model=quantized", f"model.path={saved}"), tmp_path / "b", progress=False
    )
    assert ppl(again) == ppl(record) and again["method"] == "vptq"
