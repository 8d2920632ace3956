"""NF4 / FP4 / HQQ through a whole run on a tiny random llama: committed formats, exact bits in the
record, and a saved model that reloads (fake and packed) with the run's perplexity."""

import pytest

from quantlab.experiments.run.cli import run_from_config
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY
from tests.experiments.store.test_artifacts import cache, ppl  # noqa: F401, F811  (the private-cache fixture; a record's perplexities)

BASE = [t for t in TINY if not t.startswith(("method=", "bits=", "group_size="))]


@pytest.mark.parametrize(
    ("args", "bits_per_weight"),
    [(["method=nf4", "method.double_quant=true"], None), (["method=fp4", "method.group_size=32"], 4 + 32 / 32),
     (["method=hqq", "bits=3", "method.group_size=32"], 3 + 32 / 32)],
    ids=["nf4-double-quant", "fp4", "hqq-w3"],
)
def test_a_baseline_runs_saves_and_reloads(args, bits_per_weight, tmp_path, cache, data_dir):  # noqa: F811
    first = run_from_config(compose_config(*BASE, *args, "save_model=true"), tmp_path / "a", progress=False)
    assert first["status"] == "ok" and len(first["layers"]) == 14
    if bits_per_weight is not None:
        assert all(layer["bits_per_weight"] == bits_per_weight for layer in first["layers"])
    else:  # double quantization: 4 + 8/64 + second-level scales and the offset, under 4.2
        assert all(4.125 < layer["bits_per_weight"] < 4.2 for layer in first["layers"])
    saved = tmp_path / "a" / "quantized_model"
    again = run_from_config(compose_config(*BASE, "model=quantized", f"model.path={saved}"), tmp_path / "b",
                            progress=False)
    assert ppl(again) == ppl(first) and again["layers"] == first["layers"]
    packed = run_from_config(compose_config(*BASE, "model=quantized", f"model.path={saved}", "eval.backend=packed"),
                             tmp_path / "c", progress=False)
    ratio = packed["metrics"]["ppl"]["pydocs"]["value"] / first["metrics"]["ppl"]["pydocs"]["value"]
    assert abs(ratio - 1) < 1e-3  # lookup formats store fp32 absmax: identical; HQQ: fp16 scale and zero
