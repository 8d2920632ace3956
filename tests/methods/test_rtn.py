import pytest
import torch

from quantlab.kernels.groups import group_bounds
from quantlab.methods import quantizer
from quantlab.methods.base import ConfigError
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import RTNConfig, round_to_nearest


def reference_rtn(w, grid, group_size):
    """A literal per-group loop, the oracle for the vectorized implementation."""
    out = torch.empty_like(w)
    for start, end in group_bounds(w.shape[1], group_size):
        scale, zero = quantizer.fit(w[:, start:end], grid)
        out[:, start:end] = quantizer.fake_quantize(
            w[:, start:end], scale[:, None], zero[:, None], grid.maxq, grid.float_zero
        )
    return out


@pytest.mark.parametrize("group_size", [-1, 32, 128, 100])
@pytest.mark.parametrize(
    "grid", [Grid(4), Grid(3, sym=True), Grid(2, zero_in_range=False), Grid(4, zero_in_range=False, float_zero=True)]
)
def test_vectorized_rtn_matches_the_per_group_loop(grid, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 576)
    q = round_to_nearest(w, grid, group_size)
    assert torch.equal(q.dequantize(), reference_rtn(w, grid, group_size))
    assert q.codes.max() <= grid.maxq


def test_bits_include_the_short_last_group():
    q = round_to_nearest(torch.randn(4, 576), Grid(4, zero_in_range=False), 128)
    assert q.scales.shape == (4, 5)
    assert q.storage_bits() == 4 * 576 * 4 + 4 * 5 * (16 + 4)


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errors = [(round_to_nearest(w, Grid(b), 128).dequantize() - w).norm() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match=r"bits=1; valid: 2, 3, 4, 5, 6, 7, 8"):
        RTNConfig(bits=1).validate("rtn")
    with pytest.raises(ConfigError, match="group_size=0"):
        RTNConfig(group_size=0).validate("rtn")
    with pytest.raises(ConfigError, match="float_zero"):
        RTNConfig(float_zero=True, sym=True).validate("rtn")


def test_per_tensor_rtn_fits_one_grid_to_the_whole_matrix():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=gen)
    w[3, 4] = 9.0  # one row's outlier sets everyone's scale
    grid = Grid(8, sym=True, zero_in_range=False)
    q = round_to_nearest(w, grid, -1, per_tensor=True)
    assert q.per_tensor and torch.all(q.scales == 9.0 / 127) and torch.all(q.zeros == 128)
    assert q.storage_bits() == 12 * 20 * 8 + 16  # one fp16 scale, symmetric: no zero
    per_channel = round_to_nearest(w, grid, -1)
    assert (q.dequantize() - w).abs().mean() > (per_channel.dequantize() - w).abs().mean()
    with pytest.raises(ConfigError, match="group_size=-1"):
        RTNConfig(bits=8, group_size=128, per_tensor=True).validate("rtn")
