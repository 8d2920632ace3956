"""Bit accounting of fp16 outlier columns (OWQ), on synthetic LLaMA-7B-shaped layers."""

import pytest
import torch

from quantlab.kernels import QuantizedWeight
from quantlab.methods.owq import weak_column_count
from tests.conftest import LLAMA7B_LINEARS as LLAMA7B


def synthetic(c_out, c_in, bits, n_out, group_size=-1, sym=False):
    """A QuantizedWeight of the right shapes; storage depends on shapes only, so the codes are a
    broadcast view (no 45 MB tensors)."""
    n_groups = 1 if group_size == -1 else -(-(c_in - n_out) // group_size)
    g_idx = torch.zeros(c_in, dtype=torch.int32)
    outlier_idx = torch.arange(0, 2 * n_out, 2, dtype=torch.int32)  # spread out, not a tail
    if group_size != -1:
        quantized = torch.ones(c_in, dtype=torch.bool)
        quantized[outlier_idx.long()] = False
        g_idx[quantized] = (torch.arange(c_in - n_out) // group_size).to(torch.int32)
    return QuantizedWeight(
        codes=torch.zeros(1, 1, dtype=torch.uint8).expand(c_out, c_in),
        scales=torch.ones(1, 1).expand(c_out, n_groups),
        zeros=torch.zeros(1, 1).expand(c_out, n_groups),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        zero_format="none" if sym else "int",
        outlier_idx=outlier_idx if n_out else None,
        outlier_values=torch.zeros(1, 1, dtype=torch.float16).expand(c_out, n_out) if n_out else None,
    )


@pytest.mark.parametrize("bits, target", [(3, 3.01), (4, 4.01)])
def test_llama7b_block_at_the_target_plus_row_and_index_overhead(bits, target):
    layers = {
        name: synthetic(c_out, c_in, bits, weak_column_count("llama", name, c_in, bits, target))
        for name, (c_out, c_in) in LLAMA7B.items()
    }
    counts = [0 if q.outlier_idx is None else q.outlier_idx.numel() for q in layers.values()]
    assert counts == [6, 6, 6, 6, 2, 2, 6]
    total = sum(q.storage_bits() for q in layers.values()) / sum(q.numel for q in layers.values())
    # independently: 202.4 M weights per block; 6 fp16 columns of 4096 rows in q,k,v,o,down and 2
    # of 11008 rows in gate,up, each value costing 16 - b more than a code; one fp16 scale and one
    # b-bit zero per row; one int32 index per fp16 column
    n_weights = 4 * 4096 * 4096 + 3 * 4096 * 11008
    fp16_values = 5 * 6 * 4096 + 2 * 2 * 11008
    rows = 5 * 4096 + 2 * 11008
    expected = bits + (fp16_values * (16 - bits) + rows * (16 + bits) + 32 * 34) / n_weights
    assert total == pytest.approx(expected, rel=1e-12)
    weak_only = bits + fp16_values * (16 - bits) / n_weights
    assert weak_only == pytest.approx(target, abs=0.001)  # the papers' "3.01" / "4.01"
    assert total - weak_only == pytest.approx((rows * (16 + bits) + 32 * 34) / n_weights)
    assert total - weak_only < 0.005  # the per-row scale/zero and index overhead, ~0.004 bits


def test_outlier_columns_are_skipped_by_the_group_layout():
    q = synthetic(8, 100, 3, 4, group_size=32)  # 96 quantized columns: 3 groups of 32
    assert q.scales.shape == (8, 3) and q.groups_contiguous
    assert q.storage_bits() == 8 * 96 * 3 + 8 * 3 * (16 + 3) + 4 * (16 * 8 + 32)
    shuffled = q.g_idx.clone()
    quantized = torch.ones(100, dtype=torch.bool)
    quantized[q.outlier_idx.long()] = False
    positions = quantized.nonzero().flatten()
    shuffled[positions[0]], shuffled[positions[-1]] = shuffled[positions[-1]], shuffled[positions[0]]
    q.g_idx = shuffled
    assert not q.groups_contiguous  # a real permutation still pays for its g_idx
    assert q.storage_bits() == 8 * 96 * 3 + 8 * 3 * (16 + 3) + 4 * (16 * 8 + 32) + 32 * 100


def test_symmetric_outlier_weight_has_no_zero_bits():
    q = synthetic(16, 64, 4, 2, sym=True)
    assert q.storage_bits() == 16 * 62 * 4 + 16 * 16 + 2 * (16 * 16 + 32)


def test_dequantize_puts_the_fp16_values_at_their_columns():
    codes = torch.randint(0, 8, (4, 10), dtype=torch.uint8)
    values = torch.randn(4, 2).half()
    q = QuantizedWeight(
        codes=codes,
        scales=torch.full((4, 1), 0.5),
        zeros=torch.full((4, 1), 3.0),
        g_idx=torch.zeros(10, dtype=torch.int32),
        bits=3,
        group_size=-1,
        outlier_idx=torch.tensor([7, 2], dtype=torch.int32),
        outlier_values=values,
    )
    dense = q.dequantize()
    assert torch.equal(dense[:, [7, 2]], values.float())
    others = [j for j in range(10) if j not in (2, 7)]
    assert torch.equal(dense[:, others], 0.5 * (codes[:, others].float() - 3.0))
