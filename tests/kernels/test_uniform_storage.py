import pytest
import torch

from quantlab.kernels import QuantizedWeight
from quantlab.kernels.groups import contiguous_g_idx, num_groups


def make(out=3, inp=10, group=4, bits=3, zero_format="int", g_idx=None, **extra):
    g_idx = contiguous_g_idx(inp, group) if g_idx is None else g_idx
    n = int(g_idx.max()) + 1
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out, inp), dtype=torch.uint8),
        scales=torch.rand(out, n) + 0.1, zeros=torch.randint(0, 2**bits, (out, n)).float(),
        g_idx=g_idx, bits=bits, group_size=group, zero_format=zero_format, **extra,
    )


def test_contiguous_groups_with_short_last_group():
    assert contiguous_g_idx(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert num_groups(10, 4) == 3 and num_groups(576, 128) == 5 and num_groups(576, -1) == 1


def test_dequantize_is_scale_times_code_minus_zero_per_group():
    q = make()
    expected = torch.empty(3, 10)
    for row in range(3):
        for col in range(10):
            g = col // 4
            expected[row, col] = q.scales[row, g] * (q.codes[row, col].float() - q.zeros[row, g])
    assert torch.allclose(q.dequantize(), expected)


@pytest.mark.parametrize(
    ("zero_format", "zero_bits"), [("int", 3), ("float", 16), ("none", 0)]
)
def test_storage_bits_are_exact(zero_format, zero_bits):
    q = make(zero_format=zero_format)
    # 3 rows x 10 columns x 3 bits, plus 3 rows x 3 groups x (16-bit scale + zero)
    assert q.storage_bits() == 3 * 10 * 3 + 3 * 3 * (16 + zero_bits)


def test_w4_g128_fp16_scale_and_packed_zero_is_4_156_bits():
    q = make(out=8, inp=4096, group=128, bits=4)
    assert q.bits_per_weight() == pytest.approx(4 + 20 / 128)


def test_non_contiguous_groups_pay_for_g_idx():
    g_idx = torch.tensor([1, 0, 2, 0, 1, 2, 0, 1, 2, 0], dtype=torch.int32)
    q = make(g_idx=g_idx)
    assert not q.groups_contiguous
    assert q.storage_bits() == 3 * 10 * 3 + 3 * 3 * (16 + 3) + 32 * 10


def test_outlier_columns_are_fp16_and_replace_codes():
    idx = torch.tensor([2, 7])
    values = torch.randn(3, 2)
    q = make(outlier_idx=idx, outlier_values=values)
    assert torch.equal(q.dequantize()[:, idx], values)
    assert q.storage_bits() == 3 * 8 * 3 + 3 * 3 * (16 + 3) + 2 * (16 * 3 + 32)


def test_inconsistent_shapes_are_refused():
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(
            codes=torch.zeros(2, 4, dtype=torch.uint8), scales=torch.ones(2, 1), zeros=torch.zeros(2, 1),
            g_idx=contiguous_g_idx(4, 2), bits=4, group_size=2,
        )


def per_tensor_weight(zero_format="int", bits=8, out=16, inp=32):
    scale, zero = torch.tensor([[0.02]]), torch.tensor([[float(2 ** (bits - 1)) if zero_format == "none" else 3.0]])
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out, inp), dtype=torch.uint8),
        scales=scale.repeat(out, 1), zeros=zero.repeat(out, 1), g_idx=contiguous_g_idx(inp, -1),
        bits=bits, group_size=-1, zero_format=zero_format, per_tensor=True,
    )


@pytest.mark.parametrize(("zero_format", "zero_bits"), [("int", 8), ("float", 16), ("none", 0)])
def test_per_tensor_stores_its_scale_and_zero_once(zero_format, zero_bits):
    q = per_tensor_weight(zero_format)
    assert q.storage_bits() == 16 * 32 * 8 + 16 + zero_bits  # codes, then one scale (+ zero)
    packed = q.pack()
    assert packed["scales"].shape == (1, 1)
    assert q.packed_bits() == q.storage_bits() + q.padding_bits()
    back = QuantizedWeight.unpack(packed, q.meta())
    assert back.per_tensor and back.scales.shape == (16, 1)
    assert torch.equal(back.dequantize(), q.rounded_to_storage().dequantize())


def test_per_tensor_runs_on_the_reference_and_int8_paths():
    from quantlab.kernels.linear import QuantLinear

    q = per_tensor_weight("int")
    x = torch.randn(3, 32)
    for backend in ("reference", "int8_cpu"):
        layer = QuantLinear.from_format(q, backend=backend)
        assert layer.to_format().per_tensor
        torch.testing.assert_close(layer.dequantize(), q.rounded_to_storage().dequantize())
        torch.testing.assert_close(layer(x), x @ layer.dequantize().T, rtol=0.05, atol=0.05)


def test_per_tensor_refuses_rows_that_differ_and_groups():
    q = per_tensor_weight()
    with pytest.raises(ValueError, match="same"):
        QuantizedWeight(codes=q.codes, scales=q.scales + torch.arange(16.0)[:, None], zeros=q.zeros,
                        g_idx=q.g_idx, bits=8, group_size=-1, per_tensor=True)
    with pytest.raises(ValueError, match="group_size -1"):
        QuantizedWeight(codes=q.codes, scales=torch.ones(16, 2), zeros=torch.zeros(16, 2),
                        g_idx=contiguous_g_idx(32, 16), bits=8, group_size=16, per_tensor=True)
