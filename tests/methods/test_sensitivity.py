"""The sensitivity proxies against their formulas, computed by hand on small matrices."""

from __future__ import annotations

import pytest
import torch

from quantlab.methods.sensitivity import fisher_error, hessian_trace_error, output_error

W = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
W_HAT = torch.tensor([[1.5, -2.0, 0.0], [0.0, 2.0, -1.0]])  # ΔW = [[0.5, 0, -0.5], [0, -1, 0]]
H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 4.0]])


def test_hessian_trace_error_weighs_each_input_column_by_its_diagonal():
    # column norms² of ΔW: 0.25, 1, 0.25; diag H: 2, 3, 4 -> 0.5 + 3 + 1
    assert hessian_trace_error(W, W_HAT, torch.diagonal(H)) == pytest.approx(4.5)


def test_output_error_is_the_full_quadratic_form():
    # row 0: d = [0.5, 0, -0.5]: d H dᵀ = 0.25*2 + 0.25*4 + 2*(0.5*-0.5*0) = 1.5; row 1: d = [0, -1, 0]: 3
    assert output_error(W, W_HAT, H) == pytest.approx(4.5)
    # off-diagonal coupling: the two differ once the error spans correlated inputs
    W_HAT2 = W + torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert output_error(W, W_HAT2, H) == pytest.approx(2 + 3 + 2 * 1.0)
    assert hessian_trace_error(W, W_HAT2, torch.diagonal(H)) == pytest.approx(5.0)


def test_fisher_error_is_the_elementwise_weighted_square():
    fisher = torch.tensor([[1.0, 2.0, 4.0], [8.0, 0.5, 0.0]])
    assert fisher_error(W, W_HAT, fisher) == pytest.approx(0.25 * 1 + 0.25 * 4 + 1 * 0.5)


def test_a_lossless_quantization_has_zero_proxies_and_shapes_are_checked():
    assert hessian_trace_error(W, W, torch.diagonal(H)) == 0.0 and output_error(W, W, H) == 0.0
    with pytest.raises(ValueError, match="input columns"):
        hessian_trace_error(W, W_HAT, torch.ones(4))
    with pytest.raises(ValueError, match="Fisher"):
        fisher_error(W, W_HAT, torch.ones(3, 2))
