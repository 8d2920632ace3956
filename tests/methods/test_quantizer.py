"""The grids on hand-computed examples (reference/methods.md §1.3)."""

import pytest
import torch

from quantlab.methods import quantizer
from quantlab.methods.quantizer import Grid


def row(*values):
    return torch.tensor([values], dtype=torch.float32)


def test_gptq_minmax_widens_the_range_to_hold_zero():
    # range [0.5, 2.0] becomes [0, 2.0]: scale 2/3 at 2 bits, zero round(0) = 0
    scale, zero = quantizer.fit(row(0.5, 1.0, 2.0), Grid(2, zero_in_range=True))
    assert scale.item() == pytest.approx(2 / 3) and zero.item() == 0


def test_awq_raw_minmax_keeps_the_raw_range():
    scale, zero = quantizer.fit(row(0.5, 1.0, 2.0), Grid(2, zero_in_range=False))
    assert scale.item() == pytest.approx(0.5)
    # zero = clamp(-round(0.5 / 0.5), 0, 3) = clamp(-1) = 0
    assert zero.item() == 0
    scale, zero = quantizer.fit(row(-1.0, 0.2, 2.0), Grid(2, zero_in_range=False))
    assert scale.item() == pytest.approx(1.0) and zero.item() == 1


def test_gptq_asymmetric_4bit_example():
    w = row(-1.0, -0.25, 0.3, 2.0)
    scale, zero = quantizer.fit(w, Grid(4, zero_in_range=True))
    assert scale.item() == pytest.approx(3 / 15)
    assert zero.item() == 5  # round(1 / 0.2)
    codes = quantizer.quantize(w, scale[:, None], zero[:, None], 15)
    assert codes.tolist() == [[0.0, 4.0, 7.0, 15.0]]  # -0.25/0.2 = -1.25 -> -1; 0.3/0.2 = 1.5 -> 2 (ties to even)


def test_gptq_symmetric_quirk_clips_the_largest_positive_weight():
    w = row(-1.0, 0.5, 2.0)
    scale, zero = quantizer.fit(w, Grid(4, sym=True, zero_in_range=True))
    assert scale.item() == pytest.approx(4 / 15) and zero.item() == 8
    deq = quantizer.fake_quantize(w, scale[:, None], zero[:, None], 15)
    # +2.0 / (4/15) = 7.5 -> round to 8 (even) + 8 = 16, clamped to 15 -> dequantizes to 7 steps
    assert deq[0, 2].item() == pytest.approx(7 * 4 / 15)


def test_gptq_symmetric_row_without_negatives_keeps_lo_zero():
    # the reference only mirrors lo where lo < 0: this row's grid is [0, 2] with zero 8
    scale, zero = quantizer.fit(row(0.5, 2.0), Grid(4, sym=True, zero_in_range=True))
    assert scale.item() == pytest.approx(2 / 15) and zero.item() == 8


def test_all_zero_row_gets_unit_range():
    scale, zero = quantizer.fit(row(0.0, 0.0), Grid(3, zero_in_range=True))
    # in fp32, 1 / (2/7) = 3.4999998, which rounds to 3 (as in the reference, also fp32)
    assert scale.item() == pytest.approx(2 / 7) and zero.item() == 3


def test_autoawq_symmetric_levels():
    w = row(-2.0, 0.7, 1.0)
    scale, zero = quantizer.fit(w, Grid(4, sym=True, zero_in_range=False))
    assert scale.item() == pytest.approx(2 / 7) and zero.item() == 8
    deq = quantizer.fake_quantize(w, scale[:, None], zero[:, None], 15)
    assert deq[0, 0].item() == pytest.approx(-2.0)  # -7 steps: inside [-8, 7]


def test_float_zero_grid_is_exactly_min_plus_k_steps():
    lo, step = -0.3712, 0.0517
    w = row(*(lo + k * step for k in (0, 3, 7, 15, 11)))
    scale, zero = quantizer.fit(w, Grid(4, zero_in_range=False, float_zero=True))
    deq = quantizer.fake_quantize(w, scale[:, None], zero[:, None], 15, float_zero=True)
    assert torch.allclose(deq, w, atol=1e-6)
    # the integer zero-point grid cannot represent it
    scale, zero = quantizer.fit(w, Grid(4, zero_in_range=False))
    assert not torch.allclose(quantizer.fake_quantize(w, scale[:, None], zero[:, None], 15), w, atol=1e-4)


def test_integer_zero_is_added_after_rounding():
    # 0.5 rounds to 0 (even); + zero 1 -> code 1. Rounding after adding would give round(1.5) = 2.
    codes = quantizer.quantize(row(0.5), torch.tensor([[1.0]]), torch.tensor([[1.0]]), 15)
    assert codes.item() == 1


def test_float_zero_needs_raw_asymmetric_grid():
    with pytest.raises(ValueError, match="float_zero"):
        Grid(4, sym=True, zero_in_range=False, float_zero=True)


