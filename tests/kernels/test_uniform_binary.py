"""Sign-binarized 1-bit groups in UniformWeight (`binary_one_bit`, SliM-LLM's 1-bit groups):
the reference's sign(w - z) * delta + z bit for bit, exact storage, packing round trips."""

import pytest
import torch

from quantlab.kernels import UniformWeight, format_from_packed
from quantlab.kernels.groups import contiguous_g_idx
from quantlab.kernels.linear import QuantLinear


def binary_weight(out=6, inp=40, group_size=8, seed=0) -> UniformWeight:
    """Groups of widths [1, 2, 3, 2, 1]: the 1-bit groups hold a float mean and mean |w| per row."""
    gen = torch.Generator().manual_seed(seed)
    widths = torch.tensor([1, 2, 3, 2, 1], dtype=torch.int32)
    g_idx = contiguous_g_idx(inp, group_size)
    maxq = (2 ** widths.long() - 1)[g_idx.long()]
    codes = (torch.rand(out, inp, generator=gen) * (maxq + 1)).floor().clamp(max=maxq).to(torch.uint8)
    scales = torch.rand(out, 5, generator=gen) * 0.1 + 1e-3
    zeros = (torch.rand(out, 5, generator=gen) * 2 ** widths).floor()
    zeros[:, widths == 1] = torch.randn(out, 2, generator=gen) * 0.01  # row means: any float
    return UniformWeight(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=2, group_size=group_size,
        group_bits=widths, binary_one_bit=True,
    )


def test_one_bit_groups_dequantize_as_the_reference_binarization():
    w = binary_weight()
    dense = w.dequantize()
    for g in (0, 4):
        cols = slice(8 * g, 8 * g + 8)
        delta, z = w.scales[:, g : g + 1], w.zeros[:, g : g + 1]
        sign = torch.where(w.codes[:, cols] == 1, 1.0, -1.0)
        assert torch.equal(dense[:, cols], sign * delta + z)  # the reference's expression, bit for bit
    affine = w.scales[:, 1:2] * (w.codes[:, 8:16].float() - w.zeros[:, 1:2])
    assert torch.equal(dense[:, 8:16], affine)  # the other groups keep the affine rule


def test_storage_counts_a_float_zero_for_binary_groups():
    w = binary_weight()
    out = 6
    codes = out * 8 * (1 + 2 + 3 + 2 + 1)
    scales = out * 5 * 16
    zeros = out * (2 + 3 + 2) + out * 2 * 16  # int zeros at their width, fp16 means for 1-bit groups
    assert w.storage_bits() == codes + scales + zeros + 8 * 5
    assert w.packed_bits() == w.storage_bits() + w.padding_bits()


def test_pack_round_trip_gives_the_stored_weight():
    w = binary_weight()
    back = format_from_packed(w.pack(), w.meta())
    stored = w.rounded_to_storage()
    assert back.binary_one_bit and torch.equal(back.zeros, stored.zeros)
    assert torch.equal(back.dequantize(), stored.dequantize())
    assert w.pack()["zeros.1bit"].dtype == torch.float16


def test_reference_path_runs_it_and_fast_paths_refuse_it():
    w = binary_weight()
    layer = QuantLinear.from_format(w, backend="reference")
    x = torch.randn(3, 40)
    assert torch.allclose(layer(x), x @ w.rounded_to_storage().dequantize().T, atol=1e-6)
    assert layer.kernel == "reference"


def test_binary_groups_need_mixed_widths_and_int_zeros():
    w = binary_weight()
    with pytest.raises(ValueError, match="binary_one_bit"):
        UniformWeight(codes=w.codes, scales=w.scales, zeros=w.zeros, g_idx=w.g_idx, bits=2, group_size=8,
                      binary_one_bit=True)
