"""A real quantized SmolLM2-135M: W4 g128 saved, reloaded, and run on the packed CPU int4 kernel
(evaluation cut to a few short windows: the saving and reloading is what is tested, not the
quality). RTN, because GPTQ's solver alone takes minutes on this CPU and the folder does not
depend on the method: GPTQ's own reload is tested on the tiny model (test_artifacts.py) and
measured on SmolLM2 in the README."""

import pytest
import torch

from quantlab.experiments.data.protocols import eval_windows
from quantlab.experiments.evaluation.perplexity import perplexity
from quantlab.experiments.models.adapters import architecture_for
from quantlab.experiments.models.quantized import WEIGHTS_FILE, load_quantized_model
from quantlab.experiments.run.cli import run_from_config
from tests.conftest import compose_config
from tests.experiments.store.test_artifacts import cache, ppl  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

SMOL_W4 = [
    "model=smollm2-135m", "method=rtn", "bits=4", "group_size=128", "eval.ppl.datasets=[pydocs]",
    "eval.ppl.seqlen=256", "eval.ppl.max_windows=3",
]


def test_w4_saved_reloaded_and_packed(tmp_path, cache, data_dir):  # noqa: F811
    first = run_from_config(compose_config(*SMOL_W4, "save_model=true"), tmp_path / "a", progress=False)
    saved = tmp_path / "a" / "quantized_model"
    assert first["quantized_model"]["artifact_bytes"] == (saved / WEIGHTS_FILE).stat().st_size
    # Reloaded from the folder, the fake-quant model is the run's own: identical perplexity.
    again = run_from_config(
        compose_config(*SMOL_W4, "model=quantized", f"model.path={saved}"), tmp_path / "b", progress=False
    )
    assert ppl(again) == ppl(first)
    # The packed model on torch's CPU int4 kernel: every linear on the fast path, the same model up
    # to fp16 scales (2^-11) and the kernel's bf16 activations (2^-9). Measured for GPTQ W4 g128 on
    # 40 WikiText-2 windows of 2048: 28.434 packed against 28.396 fake, a ratio of 1.0013 (README);
    # 1% leaves room for 3 short windows.
    packed = run_from_config(
        compose_config(*SMOL_W4, "model=quantized", f"model.path={saved}", "eval.backend=packed"),
        tmp_path / "c", progress=False,
    )
    backend = packed["quantized_model"]["eval_backend"]
    assert backend["kernels"] == {"int4_cpu": len(first["layers"])}, backend
    ratio = ppl(packed)["pydocs"] / ppl(first)["pydocs"]
    assert abs(ratio - 1) < 1e-2, ratio

    # The standalone loader (the folder alone): its fake model is the run's, its packed reference
    # model the stored weights.
    fake, tokenizer, _ = load_quantized_model(saved, backend="fake")
    reference, _, _ = load_quantized_model(saved, backend="packed", kernel="reference")
    windows = eval_windows("pydocs", tokenizer, 256, 3).input_ids
    arch = architecture_for(fake.config.model_type)
    assert perplexity(fake, arch, windows, batch_size=1).value == ppl(first)["pydocs"]
    with torch.no_grad():
        a, b = fake(windows[:1]).logits, reference(windows[:1]).logits
    assert (a - b).abs().max() / a.abs().max() < 1e-2
