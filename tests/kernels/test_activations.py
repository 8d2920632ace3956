"""Activation fake-quant on hand-computed grids (kernels/activations.py)."""

import pytest
import torch

from quantlab.kernels.activations import ActivationFakeQuant, ActivationQuantizer


def test_sixteen_bits_is_the_identity():
    x = torch.randn(2, 3, 8)
    assert ActivationQuantizer(16).fake_quantize(x) is x
    assert ActivationFakeQuant(ActivationQuantizer(16))(x) is x


def test_values_on_the_grid_come_back_unchanged():
    # scale 0.25 exactly: absmax 127 * 0.25 in every token; every value is 0.25 * integer
    levels = torch.tensor([[127, -127, 3, 0, -64, 100], [-127, 5, 127, -1, 2, 0]], dtype=torch.float32)
    x = 0.25 * levels
    out = ActivationQuantizer(8, "per_token", sym=True).fake_quantize(x)
    assert torch.equal(out, x)
    # asym 4-bit per tensor: range [-1, 14] * 0.5 -> scale 0.5, zero 2: grid {0.5 (k - 2)}
    x = 0.5 * torch.tensor([[-2.0, 13.0, 0.0, 7.0]])
    assert torch.equal(ActivationQuantizer(4, "per_tensor", sym=False).fake_quantize(x), x)


def test_hand_computed_asymmetric_two_bit_token():
    # [lo, hi] = [-1, 2]: scale 1, zero round(1) = 1; 0.4 -> round(0.4) + 1 = 1 -> 0; 1.5 -> 2 (even) + 1 -> 2
    x = torch.tensor([[-1.0, 0.4, 1.5, 2.0]])
    out = ActivationQuantizer(2, "per_token", sym=False).fake_quantize(x)
    assert out.tolist() == [[-1.0, 0.0, 2.0, 2.0]]


def test_hand_computed_symmetric_four_bit_token():
    # absmax 3.5: scale 0.5, levels [-8, 7]; 1.2 -> 2.4 -> 2 -> 1.0; -0.75 -> -1.5 -> -2 (even) -> -1.0
    x = torch.tensor([[3.5, 1.2, -0.75, -3.5]])
    out = ActivationQuantizer(4, "per_token", sym=True).fake_quantize(x)
    assert out.tolist() == [[3.5, 1.0, -1.0, -3.5]]


def test_per_token_rows_are_independent_and_per_tensor_is_not():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 16, generator=gen)
    louder = x.clone()
    louder[0, 0] *= 100  # one token gets a huge range
    per_token = ActivationQuantizer(4, "per_token")
    a, b = per_token.fake_quantize(x), per_token.fake_quantize(louder)
    assert torch.equal(a.reshape(-1, 16)[1:], b.reshape(-1, 16)[1:])
    row = x.reshape(-1, 16)[5:6]
    assert torch.equal(per_token.fake_quantize(row), a.reshape(-1, 16)[5:6])  # a token alone: same
    per_tensor = ActivationQuantizer(4, "per_tensor")
    assert not torch.equal(per_tensor.fake_quantize(x)[1], per_tensor.fake_quantize(louder)[1])


def test_static_range_clips_and_equals_dynamic_on_the_calibration_tensor():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=gen)
    for sym in (True, False):
        static = ActivationFakeQuant(ActivationQuantizer(8, "per_tensor", sym, "static"))
        lo, hi = torch.aminmax(x)
        static.calibrate(lo, hi)
        assert torch.equal(static(x), ActivationQuantizer(8, "per_tensor", sym).fake_quantize(x))
        wide = 10 * x
        top = static.scale * (static.config.grid().maxq - static.zero)  # the largest value on the grid
        assert static(wide).max().item() == pytest.approx(top.item())
    # sym static: scale = max(|lo|, |hi|) / 127 from an observer's range
    quantizer = ActivationQuantizer(8, "per_tensor", True, "static")
    scale, zero = quantizer.static_params(torch.tensor(-2.54), torch.tensor(1.0))
    assert scale.item() == pytest.approx(0.02) and zero.item() == 128


def test_dtype_and_shape_are_kept():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    out = ActivationQuantizer(8).fake_quantize(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_invalid_configs_name_the_knob():
    with pytest.raises(ValueError, match="act.bits"):
        ActivationQuantizer(12)
    with pytest.raises(ValueError, match="per_tensor"):
        ActivationQuantizer(8, "per_token", mode="static")
    with pytest.raises(ValueError, match="calibrated"):
        ActivationFakeQuant(ActivationQuantizer(8, "per_tensor", mode="static"))(torch.randn(2, 4))
    with pytest.raises(ValueError, match="static"):
        ActivationFakeQuant(ActivationQuantizer(8)).calibrate(torch.tensor(-1.0), torch.tensor(1.0))


def test_an_attached_input_quantizer_runs_in_front_of_linear_and_quantlinear():
    from quantlab.kernels.activations import attach_input_quantizer
    from quantlab.kernels.linear import QuantLinear
    from quantlab.methods.quantizer import Grid
    from quantlab.methods.rtn import round_to_nearest

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    config = ActivationQuantizer(4, "per_token", sym=True)
    packed = QuantLinear.from_format(round_to_nearest(linear.weight, Grid(8, sym=True, zero_in_range=False), -1),
                                     linear.bias, backend="reference")
    expected = {id(m): m(config.fake_quantize(x)) for m in (linear, packed)}
    for module in (linear, packed):
        attach_input_quantizer(module, ActivationFakeQuant(config))
        assert torch.equal(module(x), expected[id(module)])
        with pytest.raises(ValueError, match="already has"):
            attach_input_quantizer(module, ActivationFakeQuant(config))
