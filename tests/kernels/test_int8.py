"""The W8A8 torch._int_mm path against the fake-quant reference in float64 (kernels/int8.py)."""

import pytest
import torch
import torch.nn.functional as F

from quantlab.kernels import grid as grids
from quantlab.kernels.activations import ActivationQuantizer
from quantlab.kernels.fastpaths import UnsupportedFormat
from quantlab.kernels.int8 import INT8_GRID, Int8Linear, benchmark, quantize_tokens, w8a8_blockers
from quantlab.kernels.uniform import UniformWeight

U = 2.0**-24  # fp32 unit roundoff


def reference(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """sum_k x_hat[t, k] W_hat[n, k] in float64 from the grids' own scales and codes: each
    x_hat = scale * code is exact in float64 (24-bit scale times an 8-bit integer)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale, zero = ActivationQuantizer(8, "per_token", sym=True).dynamic_params(rows)
    x_hat = scale.double() * (grids.quantize(rows, scale, zero, 255) - zero).double()
    w_scale, w_zero = grids.fit(layer.dequantize(), INT8_GRID)  # refitting the dequantized weight: same grid
    assert torch.equal(w_scale, layer.scales)
    w_hat = layer.scales.double()[:, None] * layer.codes.double()
    return x_hat @ w_hat.T, x_hat.abs() @ w_hat.abs().T


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (5, 24, 13), (33, 64, 40), (64, 576, 96)])
def test_int8_path_equals_the_fake_quant_reference_up_to_the_fp32_rescale(m, k, n):
    gen = torch.Generator().manual_seed(m * k + n)
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))  # channel outliers
    layer = Int8Linear.from_float(torch.randn(n, k, generator=gen))
    y = layer(x)
    y_ref, magnitude = reference(x, layer)
    # the integer sum is exact; float(acc) * (sx * sw) rounds three times: <= 3u |y| to first order.
    # The float64 reference itself errs by <= k 2^-53 sum|terms|, covered by the second term.
    bound = 4 * U * y_ref.abs() + 1e-13 * magnitude
    assert bool(((y.double() - y_ref).abs() <= bound).all())


def test_codes_are_the_activation_fake_quant_codes():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=gen) * 3
    codes, scale = quantize_tokens(x)
    fake = ActivationQuantizer(8, "per_token", sym=True).fake_quantize(x)
    assert codes.dtype == torch.int8 and torch.equal(scale * codes.float(), fake)
    assert codes.abs().max().item() == 127  # each token's absmax lands on +-127


def test_bias_batch_dims_and_dtype():
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(16, 32, generator=gen), torch.randn(16, generator=gen)
    layer = Int8Linear.from_float(weight, bias)
    x = torch.randn(2, 3, 32, generator=gen)
    y = layer(x)
    assert y.shape == (2, 3, 16)
    torch.testing.assert_close(y, Int8Linear.from_float(weight)(x) + bias)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_benchmark_reports_tokens_per_second():
    result = benchmark(32, 64, 48, threads=1, repeats=1)
    for name in ("fp32", "int8", "int8_matmul_only"):
        assert result[f"{name}_tokens_per_s"] > 0 and result[f"{name}_cpu_s"] >= 0
    assert result["threads"] == 1


def _uniform(weight: torch.Tensor, bits: int = 8, group_size: int = -1, sym: bool = True) -> UniformWeight:
    """weight on a per-row (or grouped) grid of kernels/grid.py, as a method would store it."""
    out, k = weight.shape
    size = k if group_size == -1 else group_size
    grid = grids.Grid(bits, sym=sym, zero_in_range=not sym)
    groups = weight.reshape(out, k // size, size)
    scale, zero = grids.fit(groups.reshape(-1, size), grid)
    scale, zero = scale.reshape(out, -1), zero.reshape(out, -1)
    codes = grids.quantize(groups, scale[..., None], zero[..., None], grid.maxq).reshape(out, k)
    return UniformWeight(codes.to(torch.uint8), scale, zero, torch.arange(k, dtype=torch.int32) // size, bits,
                         group_size, zero_format="none" if sym else "int")


def test_from_format_holds_the_stored_weight_and_runs_the_fake_quant_computation():
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(24, 64, generator=gen), torch.randn(24, generator=gen)
    fmt = _uniform(weight)
    layer = Int8Linear.from_format(fmt, bias)
    assert layer.codes.dtype == torch.int8 and torch.equal(layer.dequantize(), fmt.dequantize())
    x = torch.randn(3, 7, 64, generator=gen) * torch.exp(torch.randn(64, generator=gen))
    fake = F.linear(ActivationQuantizer(8, "per_token", sym=True).fake_quantize(x), fmt.dequantize(), bias)
    torch.testing.assert_close(layer(x), fake, rtol=1e-5, atol=1e-5)
    assert dict(layer.state_dict()).keys() == {"codes", "scales", "bias"}


@pytest.mark.parametrize("kwargs,reason", [
    ({"group_size": 32}, "groups per row"),
    ({"sym": False}, "zero-points other than 128"),
    ({"bits": 4}, "needs 8-bit codes"),
])
def test_from_format_refuses_weights_it_cannot_hold(kwargs, reason):
    fmt = _uniform(torch.randn(8, 64, generator=torch.Generator().manual_seed(4)), **kwargs)
    assert any(reason in r for r in w8a8_blockers(fmt))
    with pytest.raises(UnsupportedFormat, match=reason):
        Int8Linear.from_format(fmt)
