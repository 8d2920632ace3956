"""GPTQ (AutoGPTQ / GPTQModel) and AutoAWQ GEMM checkpoints: read back by independent unpackers
(AutoGPTQ's v1 `zeros + 1`, AutoAWQ's nibble order) to the stored weights, bit for bit."""

import json

import pytest
import torch

from quantlab.experiments.export import ExportRefused, export_model
from quantlab.experiments.export.gptq import awq_tensors, gptq_tensors
from quantlab.experiments.export.readers import read_awq, read_gptq, unpack_bits
from tests.experiments.export.conftest import act_order, rtn, save_tiny


def test_three_bit_qweight_is_autogptqs_straddling_packing():
    """AutoGPTQ's 3-bit packer, transcribed: 10 values, then one split across words, ..."""
    codes = torch.randint(0, 8, (32, 64), generator=torch.Generator().manual_seed(0))
    fmt = rtn(3, 32)("layer", torch.randn(32, 64))
    fmt.codes = codes.to(torch.uint8)
    qweight = gptq_tensors(fmt, "gptq_v2")["qweight"].T  # [out, words]
    for row in range(32):
        intweight = [int(v) for v in codes[row]]
        words, i = [], 0
        while i < 64:
            w0 = sum(intweight[i + j] << (3 * j) for j in range(10)) | ((intweight[i + 10] << 30) & 0xFFFFFFFF)
            w1 = (intweight[i + 10] >> 2) & 1
            w1 |= sum(intweight[i + 11 + j] << (3 * j + 1) for j in range(10)) | ((intweight[i + 21] << 31) & 0xFFFFFFFF)
            w2 = (intweight[i + 21] >> 1) & 0x3
            w2 |= sum(intweight[i + 22 + j] << (3 * j + 2) for j in range(10))
            words += [w0, w1, w2]
            i += 32
        assert [w & 0xFFFFFFFF for w in qweight[row].tolist()] == words


@pytest.mark.parametrize("sym", [True, False])
def test_v1_stores_zero_minus_one(sym):
    fmt = rtn(4, 32, sym=sym)("layer", torch.randn(16, 64) + (0.0 if sym else 0.3))
    zeros = fmt.rounded_to_storage().zeros.round().long()
    if (zeros == 0).any():
        pytest.skip("a zero-point of 0 (refused in v1, tested below)")
    v1 = unpack_bits(gptq_tensors(fmt, "gptq")["qzeros"], 4, 16)
    v2 = unpack_bits(gptq_tensors(fmt, "gptq_v2")["qzeros"], 4, 16)
    assert torch.equal(v2, zeros.T) and torch.equal(v1, zeros.T - 1)
    if sym:
        assert bool((v1 == 7).all())  # the symmetric 4-bit grid's 8, stored as 7


def test_a_zero_point_of_zero_is_refused_in_v1():
    w = torch.randn(8, 64).abs()  # groups without negative weights: zero-point 0 on the raw min-max grid
    fmt = rtn(4, 32)("layer", w)
    assert bool((fmt.zeros == 0).any())
    with pytest.raises(ExportRefused, match="gptq_v2"):
        gptq_tensors(fmt, "gptq")
    gptq_tensors(fmt, "gptq_v2")


@pytest.mark.parametrize("case", ["w4-asym-g32", "w4-sym-g64", "w3-asym-g32", "w8-sym-channel", "w2-asym-g32",
                                  "w4-act-order"])
def test_gptq_checkpoint_reads_back(case, tiny_llama, tmp_path):
    quantize = {"w4-asym-g32": rtn(4, 32), "w4-sym-g64": rtn(4, 64, sym=True), "w3-asym-g32": rtn(3, 32),
                "w8-sym-channel": rtn(8, -1, sym=True), "w2-asym-g32": rtn(2, 32),
                "w4-act-order": act_order(4, 32, sym=True)}[case]
    formats = save_tiny(tiny_llama, tmp_path / "saved", quantize)
    version = "gptq_v2" if case == "w2-asym-g32" else "gptq"  # v2: GPTQModel's true zero-points
    summary = export_model(tmp_path / "saved", "gptq", tmp_path / "gptq", checkpoint_format=version)
    quant = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert quant == summary["quantization_config"] and quant["checkpoint_format"] == version
    assert quant["desc_act"] == (case == "w4-act-order")
    dense = read_gptq(tmp_path / "gptq")
    assert set(dense) == set(formats)
    for name, fmt in formats.items():
        assert torch.equal(dense[name], fmt.rounded_to_storage().dequantize()), name


@pytest.mark.parametrize("case", ["w4-asym-g32", "w4-asym-g64-short-tail", "w4-sym-g32"])
def test_awq_gemm_checkpoint_reads_back(case, tiny_llama, tmp_path):
    quantize = {"w4-asym-g32": rtn(4, 32), "w4-asym-g64-short-tail": rtn(4, 64), "w4-sym-g32": rtn(4, 32, sym=True)}[case]
    formats = save_tiny(tiny_llama, tmp_path / "saved", quantize, method="awq")
    summary = export_model(tmp_path / "saved", "awq", tmp_path / "awq")
    assert summary["quantization_config"]["q_group_size"] == 32  # 160 = 2.5 x 64: g64 is written at g32
    dense = read_awq(tmp_path / "awq")
    for name, fmt in formats.items():
        assert torch.equal(dense[name], fmt.rounded_to_storage().dequantize()), name


def test_awq_nibble_order():
    fmt = rtn(4, 32)("layer", torch.randn(8, 32))
    fmt.codes = torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 32).contiguous()  # row r holds r
    word = awq_tensors(fmt, 32)["qweight"][0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_act_order_is_refused_for_awq(tiny_llama, tmp_path):
    save_tiny(tiny_llama, tmp_path / "saved", act_order(4, 32))
    with pytest.raises(ExportRefused, match="no g_idx"):
        export_model(tmp_path / "saved", "awq", tmp_path / "awq")
