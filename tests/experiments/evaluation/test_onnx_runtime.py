"""method=onnx_int8 end to end on a tiny random llama: export, ORT's dynamic and static INT8, the
evaluation in onnxruntime on the baseline's windows, exact bits read off the quantized graph."""

import pytest
import torch

from quantlab.experiments.run.cli import load_group_option, run_from_config
from quantlab.experiments.run.schema import validate
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY

pytest.importorskip("onnxruntime", reason="onnxruntime (the `baselines` extra)")
pytest.importorskip("onnxscript", reason="onnxscript (the `baselines` extra)")

ORT = [*TINY, "method=onnx_int8", "bits=8", "group_size=-1"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from tests.experiments.store.test_shared_inputs import private_cache

    root = private_cache(tmp_path)
    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(root))
    return root


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_ort_int8_quantizes_the_block_linears_and_evaluates_in_onnxruntime(mode, tmp_path, cache, data_dir):
    record = run_from_config(compose_config(*ORT, f"method.mode={mode}"), tmp_path / mode, progress=False)
    assert record["status"] == "ok" and record["method"] == "onnx_int8"
    layers = record["layers"]
    assert len(layers) == 2 * 7  # every decoder-block linear, nothing else (the head stays fp32)
    for layer in layers:  # int8 weights + one fp32 scale + one int8 zero-point per tensor
        out_features, in_features = layer["shape"]
        assert layer["storage_bits"] == 8 * out_features * in_features + 32 + 8
        assert layer["rel_weight_error"] < 0.02
    numel = sum(a * b for a, b in (layer["shape"] for layer in layers))
    assert record["avg_bits"] == pytest.approx(8 + 40 * len(layers) / numel)
    backend = record["quantized_model"]["eval_backend"]
    assert backend["backend"] == "onnxruntime" and backend["quantized_matmuls"] == 14
    assert ("MatMulInteger" in backend["ops"]) == (mode == "dynamic")
    assert ("QuantizeLinear" in backend["ops"]) == (mode == "static")
    ppl = record["metrics"]["ppl"]["pydocs"]
    # int8 on a random tiny model: near the fp32 baseline, measured on the same windows
    assert ppl["n_windows"] == 6 and abs(ppl["vs_baseline"]["ppl_ratio"] - 1) < 0.05
    if mode == "static":
        assert record["calib"]["n_sequences"] == 4 and backend["activation_scales"] > 0


def test_the_exported_graph_computes_the_torch_model(tmp_path, cache):
    """The fp32 export is the model: same logits through onnxruntime, so any PPL change is ORT's INT8."""
    import onnx

    from quantlab.experiments.evaluation import onnx_runtime
    from quantlab.experiments.models.loading import load_model
    from quantlab.experiments.run.schema import model_spec

    loaded = load_model(model_spec(load_group_option("model", "tiny-llama")), model_spec(load_group_option("model", "smollm2-135m")))
    path = onnx_runtime.cached_export(loaded.model, loaded.fingerprint, cache)
    mapping = onnx_runtime.map_linears(onnx.load(str(path)).graph, onnx_runtime.block_linears(loaded.model, loaded.architecture))
    assert len(mapping) == 14
    window = torch.randint(0, 1000, (40,))
    with torch.no_grad():
        logits = loaded.model(input_ids=window[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1], window[1:]).item()
    assert onnx_runtime.window_nll(onnx_runtime._session(path), window) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["method.mode=fast"], "mode='fast'"), (["method.group_size=128"], "no groups"),
     (["method.activation_type=int8"], "mode=static only"), (["method.mode=static", "method.calibrate_method=mse"], "calibrate_method")],
)
def test_bad_method_configs_name_the_fix(extra, message):
    from quantlab.methods.base import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*ORT, *extra), load_group_option)
