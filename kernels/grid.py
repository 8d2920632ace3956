"""Uniform scalar grids: how a range [lo, hi] becomes (scale, zero), and the code <-> value rule
(reference/methods.md §1.3). Weights (methods/quantizer.py fits them per row) and activations
(kernels/activations.py, at run time) share this one definition.

Every grid maps x to a code q = clamp(round(x / scale) + zero, 0, 2^b - 1) and back to
scale * (q - zero); `torch.round` rounds ties to even, as in every reference. They differ in how
(scale, zero) are fitted from a range [lo, hi]:

- GPTQ min-max (`zero_in_range=True`): the range is widened to contain 0; an all-zero row gets
  (-1, 1). Symmetric: hi = max(|lo|, hi), lo = -hi only where lo < 0 (quirk kept: a row with no
  negative weight keeps lo = 0), scale = (hi - lo) / maxq and zero = (maxq + 1) / 2, so +hi lands on
  7.5 steps at 4 bits and is clamped to 7 (the largest weight shrinks to ~0.93 hi).
  Asymmetric, this is PyTorch's affine rule: scale = (hi - lo) / maxq, zero = round(-lo / scale),
  0 exactly representable.
- AWQ raw min-max (`zero_in_range=False`): the raw range, scale = max(hi - lo, 1e-5) / maxq and
  zero = clamp(-round(lo / scale), 0, maxq). Symmetric follows AutoAWQ (llm-awq never used its own):
  levels [-2^(b-1), 2^(b-1) - 1], scale = max(|lo|, |hi|) / (2^(b-1) - 1) (the absmax grid of
  SmoothQuant and LLM.int8 activations).
- Floating zero (`float_zero=True`, raw range only): zero = -lo / scale is kept unrounded, so the
  grid is exactly {lo + k * scale}. This is tinygemm's / HQQ's / GGUF Q4_1's format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int
    sym: bool = False
    zero_in_range: bool = True
    float_zero: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {self.bits}")
        if self.float_zero and (self.sym or self.zero_in_range):
            raise ValueError("float_zero needs an asymmetric raw min-max grid (sym=False, zero_in_range=False)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def zero_format(self) -> str:
        if self.float_zero:
            return "float"
        return "none" if self.sym else "int"


def fit(weight: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `weight` [rows, cols], each of shape [rows]."""
    w = weight.float()
    return range_params(*row_range(w), grid)


def row_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each row of w [rows, cols]. amin / amax, because torch.aminmax(dim=) and
    min(dim=) (which also find indices) measured 10-17x slower on the CPU (torch 2.13)."""
    return w.amin(dim=1), w.amax(dim=1)


def range_params(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the grid for the ranges [lo, hi] (same-shape tensors, any shape)."""
    lo, hi = lo.float(), hi.float()
    if grid.zero_in_range:
        return gptq_params(*gptq_range(lo, hi, grid), grid)
    return _raw_params(lo, hi, grid)


def gptq_range(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ min-max range: widened to hold 0, symmetrized, (-1, 1) where both ends are 0."""
    lo = torch.clamp(lo, max=0)
    hi = torch.clamp(hi, min=0)
    if grid.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    dead = (lo == 0) & (hi == 0)
    lo = torch.where(dead, torch.full_like(lo, -1.0), lo)
    hi = torch.where(dead, torch.full_like(hi, 1.0), hi)
    return lo, hi


def gptq_params(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (hi - lo) / grid.maxq
    if grid.sym:
        zero = torch.full_like(scale, (grid.maxq + 1) / 2)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def _raw_params(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    if grid.sym:
        max_int = 2 ** (grid.bits - 1) - 1
        if max_int == 0:
            raise ValueError("a symmetric raw grid needs at least 2 bits")
        scale = torch.maximum(lo.abs(), hi.abs()).clamp(min=1e-5) / max_int
        zero = torch.full_like(scale, 2 ** (grid.bits - 1))
        return scale, zero
    scale = (hi - lo).clamp(min=1e-5) / grid.maxq
    if grid.float_zero:
        return scale, -lo / scale
    zero = torch.clamp(-torch.round(lo / scale), 0, grid.maxq)
    return scale, zero


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, float_zero: bool = False
) -> torch.Tensor:
    """Integer codes (as floats) of `w` on the grid; scale/zero broadcast against `w`.

    Integer zero-points are added after rounding, as the references do: with ties to even,
    round(x) + z and round(x + z) differ at exact halves when z is odd."""
    if float_zero:
        return torch.clamp(torch.round(w / scale + zero), 0, maxq)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, float_zero: bool = False
) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, maxq, float_zero), scale, zero)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, the identity backward: the straight-through estimator (Bengio et al. 2013)
    that quantization-aware training (methods/qat.py) differentiates the grid through. The value is
    torch.round's bit for bit: the gradient path is added as `x - x.detach()`, which is exactly 0."""
    return torch.round(x).detach() + (x - x.detach())


def fake_quantize_ste(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, float_zero: bool = False
) -> torch.Tensor:
    """`fake_quantize` with the straight-through estimator for rounding, differentiable in `w` and
    `scale` (zero-points stay fixed). The same values as `fake_quantize`; the gradients:
    d/dw = 1 where the code is not clamped and 0 where it is (outside the grid's range);
    d/dscale = round(w/s) - w/s inside and (code - zero) at a clamped end, LSQ's rule (Esser et al.,
    ICLR'20) for a grid with a zero-point."""
    if float_zero:
        codes = torch.clamp(round_ste(w / scale + zero), 0, maxq)
    else:
        codes = torch.clamp(round_ste(w / scale) + zero, 0, maxq)
    return scale * (codes - zero)
