"""The real checks on SmolLM2-135M (shipped as a Q4_1 GGUF file).

GGUF: RTN W4 g32 with a float zero-point re-finds the Q4_1 grid the file was written on, and the
export writes the file's own bytes back in every block whose codes span the full range; the
exported file, loaded through transformers' GGUF loader, holds the original's weights exactly.
compressed-tensors: an RTN W4 g128 model (the same layout as GPTQ W4 g128, in seconds instead of
minutes; GPTQ's is measured in the README) reloads through transformers with the run's logits.
"""

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from quantlab.experiments.export import export_model
from quantlab.experiments.export.readers import decode_gguf_blocks
from quantlab.experiments.models.loading import package_gguf_path
from tests.experiments.export.conftest import decoder_linears, fake_quant_copy, logits, rtn, save_tiny

pytestmark = pytest.mark.slow


def test_q4_1_export_gives_back_the_shipped_file(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny(smollm2, tmp_path / "saved", rtn(4, 32, float_zero=True), model_name="smollm2-135m")
    summary = export_model(tmp_path / "saved", "gguf", tmp_path / "gguf")
    assert summary["gguf_types"] == {"Q4_1": 210} and summary["copied_from_source"] == {"Q8_0": 1, "F32": 61}
    original = {t.name: t for t in GGUFReader(package_gguf_path()).tensors}
    exported = {t.name: t for t in GGUFReader(tmp_path / "gguf" / "model.gguf").tensors}
    assert set(exported) == set(original)
    full_blocks = other_blocks = 0
    for name, tensor in original.items():
        a, b = np.asarray(tensor.data), np.asarray(exported[name].data)
        assert exported[name].tensor_type == tensor.tensor_type, name
        if tensor.tensor_type.name != "Q4_1":
            assert np.array_equal(a, b), name  # embedding (Q8_0) and norms: copied
            continue
        a, b = a.reshape(-1, 20), b.reshape(-1, 20)
        fields = decode_gguf_blocks(a, "Q4_1")
        full = (fields["q"].min(axis=1) == 0) & (fields["q"].max(axis=1) == 15) & (fields["d"] != 0)
        assert (a[full] == b[full]).all(), name  # codes, d and m bit for bit
        full_blocks += int(full.sum())
        other_blocks += int((~full).sum())
    assert full_blocks > 0.99 * (full_blocks + other_blocks)
    # dequantized values identical everywhere: transformers' loader gives the original's weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    for name, linear in decoder_linears(smollm2.model).items():
        assert torch.equal(reloaded.get_submodule(name).weight, linear.weight), name


def test_w4_g128_compressed_tensors_reloads_through_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    formats = save_tiny(smollm2, tmp_path / "saved", rtn(4, 128), model_name="smollm2-135m")
    summary = export_model(tmp_path / "saved", "compressed-tensors", tmp_path / "ct")
    assert summary["schemes"] == 1  # 576-wide layers at g64, the 1536-wide ones too: one scheme
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    fake = fake_quant_copy(smollm2, formats)
    for name in formats:
        assert torch.equal(reloaded.get_submodule(name).weight, fake.get_submodule(name).weight), name
    a, b = logits(reloaded, ids), logits(fake, ids)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
