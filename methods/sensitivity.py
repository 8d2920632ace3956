"""Cheap proxies for the damage of quantizing one linear, from statistics of full-precision inputs.

Symbols: W the [out, in] weight, Ŵ its quantized value, ΔW = Ŵ - W; H = (2/N) Σ x xᵀ the layer
Hessian GPTQ uses (methods/hessian.py, N calibration sequences, the sum over their tokens); F the
empirical Fisher diagonal of the language-model loss, F = (1/S) Σ_s (∂L_s/∂W)², L_s the mean
next-token NLL of calibration sequence s (experiments/run/sensitivity.py computes it).

- `hessian_trace_error` = Σ_j H_jj · ‖ΔW_:,j‖²: the diagonal of the OBS / second-order term
  tr(ΔW H ΔWᵀ), input column j weighted by its input energy H_jj (the "Hessian trace ×
  quantization error" proxy of HAWQ-style sensitivity, at the granularity of input columns);
- `output_error` = tr(ΔW H ΔWᵀ) = Σ_i ΔW_i,: H ΔW_i,:ᵀ: the whole quadratic form, i.e. 2/N times
  the squared error the layer's outputs make on the calibration tokens (GPTQ's objective);
- `fisher_error` = Σ_ij F_ij ΔW_ij²: the Fisher-weighted quantization error (a diagonal-Fisher
  estimate of the loss increase, up to the factor 1/2).

A unit of several linears (a block) sums its linears' proxies. Pure tensor math: no model here.
"""

from __future__ import annotations

import torch


def _delta(weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    if weight.shape != quantized.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and its quantized value {tuple(quantized.shape)} differ in shape")
    return quantized.detach().double() - weight.detach().double()


def hessian_trace_error(weight: torch.Tensor, quantized: torch.Tensor, hessian_diag: torch.Tensor) -> float:
    """Σ_j H_jj · ‖ΔW_:,j‖² (see the module docstring); `hessian_diag` is [in]."""
    delta = _delta(weight, quantized)
    if hessian_diag.shape != (delta.shape[1],):
        raise ValueError(f"Hessian diagonal {tuple(hessian_diag.shape)} does not match {delta.shape[1]} input columns")
    return float((hessian_diag.double().to(delta.device) * delta.pow(2).sum(dim=0)).sum())


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) (see the module docstring); `hessian` is [in, in]."""
    delta = _delta(weight, quantized)
    return float(((delta @ hessian.double().to(delta.device)) * delta).sum())


def fisher_error(weight: torch.Tensor, quantized: torch.Tensor, fisher: torch.Tensor) -> float:
    """Σ_ij F_ij ΔW_ij² (see the module docstring); `fisher` has the weight's shape."""
    delta = _delta(weight, quantized)
    if fisher.shape != delta.shape:
        raise ValueError(f"Fisher {tuple(fisher.shape)} does not match the weight {tuple(delta.shape)}")
    return float((fisher.double().to(delta.device) * delta.pow(2)).sum())
