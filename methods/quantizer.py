"""Uniform scalar grids, fitted per row over a set of columns (reference/methods.md §1.3).

Every grid maps w to a code q = clamp(round(w / scale) + zero, 0, 2^b - 1) and back to
scale * (q - zero); `torch.round` rounds ties to even, as in every reference. They differ in how
(scale, zero) are fitted from a row's range [lo, hi]:

- GPTQ min-max (`zero_in_range=True`): the range is widened to contain 0; an all-zero row gets
  (-1, 1). Symmetric: hi = max(|lo|, hi), lo = -hi only where lo < 0 (quirk kept: a row with no
  negative weight keeps lo = 0), scale = (hi - lo) / maxq and zero = (maxq + 1) / 2, so +hi lands on
  7.5 steps at 4 bits and is clamped to 7 (the largest weight shrinks to ~0.93 hi).
- AWQ raw min-max (`zero_in_range=False`): the raw range, scale = max(hi - lo, 1e-5) / maxq and
  zero = clamp(-round(lo / scale), 0, maxq). Symmetric follows AutoAWQ (llm-awq never used its own):
  levels [-2^(b-1), 2^(b-1) - 1], scale = max(|w|) / (2^(b-1) - 1).
- GPTQ MSE clip search (`fit_mse`, the GPTQ grid only): shrink the min-max range and keep the scale
  with the lowest L2.4 error per row.
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
    if grid.zero_in_range:
        return _fit_gptq_minmax(w, grid)
    return _fit_raw_minmax(w, grid)


def _fit_gptq_minmax(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = _gptq_range(w, grid)
    return _gptq_params(lo, hi, grid)


def _gptq_range(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ min-max range per row: widened to hold 0, symmetrized, (-1, 1) for all-zero rows."""
    zero_ = torch.zeros(w.shape[0], device=w.device)
    lo = torch.minimum(w.min(dim=1).values, zero_)
    hi = torch.maximum(w.max(dim=1).values, zero_)
    if grid.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    dead = (lo == 0) & (hi == 0)
    lo = torch.where(dead, torch.full_like(lo, -1.0), lo)
    hi = torch.where(dead, torch.full_like(hi, 1.0), hi)
    return lo, hi


def _gptq_params(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (hi - lo) / grid.maxq
    if grid.sym:
        zero = torch.full_like(scale, (grid.maxq + 1) / 2)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def fit_mse(
    weight: torch.Tensor, grid: Grid, norm: float = 2.4, grid_points: int = 100, max_shrink: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's optional clip search (`mse=True` in gptq:quant.py), per row of `weight` [rows, cols].

    Starting from the GPTQ min-max range, try the shrunk ranges p * (lo, hi) for
    p = 1 - k / grid_points, k = 0 .. int(max_shrink * grid_points) - 1, and keep per row the first p
    with the lowest sum |w_hat - w|^norm. As in the reference, symmetric mode keeps the zero-point of
    the unshrunk fit (it is the constant 2^(b-1) anyway); asymmetric mode re-rounds it for each p."""
    if not grid.zero_in_range or grid.float_zero:
        raise ValueError("fit_mse implements GPTQ's clip search: it needs the GPTQ grid (zero_in_range=True)")
    w = weight.float()
    lo, hi = _gptq_range(w, grid)
    scale, zero = _gptq_params(lo, hi, grid)
    best = torch.full([w.shape[0]], float("inf"), device=w.device)
    for k in range(int(max_shrink * grid_points)):
        p = 1 - k / grid_points
        lo_k, hi_k = p * lo, p * hi
        scale_k = (hi_k - lo_k) / grid.maxq
        zero_k = zero if grid.sym else torch.round(-lo_k / scale_k)
        err = fake_quantize(w, scale_k[:, None], zero_k[:, None], grid.maxq)
        err = (err - w).abs_().pow_(norm).sum(dim=1)
        better = err < best  # strict: ties keep the larger range, as in the reference
        best = torch.where(better, err, best)
        scale = torch.where(better, scale_k, scale)
        zero = torch.where(better, zero_k, zero)
    return scale, zero


def _fit_raw_minmax(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    if grid.sym:
        max_int = 2 ** (grid.bits - 1) - 1
        if max_int == 0:
            raise ValueError("a symmetric raw grid needs at least 2 bits")
        scale = w.abs().amax(dim=1).clamp(min=1e-5) / max_int
        zero = torch.full_like(scale, 2 ** (grid.bits - 1))
        return scale, zero
    lo = w.min(dim=1).values
    hi = w.max(dim=1).values
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


def fit_owq(
    weight: torch.Tensor, bits: int, sym: bool = False, mse: bool = True, num: int = 100, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """OWQ's per-row quantizer (owq:owq/quant.py `find_params`, reference/methods.md §1.3, §5.3).

    Returns (scale, zero) in this module's unsigned-code convention. OWQ's symmetric grid has the
    signed levels [-2^(b-1), 2^(b-1) - 1] with zero 0; here that is codes [0, maxq] with the
    implicit zero 2^(b-1), which rounds and clamps identically (adding an integer is exact).

    `mse=False` (`--tuning minmax`): asymmetric is GPTQ's min-max exactly; symmetric uses
    scale = max(|lo|, hi) / 2^(b-1) (all-zero rows: 1 / 2^(b-1)).

    `mse=True`: a grid search unlike GPTQ's clip search. Asymmetric: for i = 1..num the range
    width R * i / num (R = hi - lo of the 0-including range), and for every zero-point zp in
    0..maxq the candidate range [-zp * D, R * i / num - zp * D], D = max(R * i / (num * maxq), 1e-8);
    the row keeps the first candidate (strictly lower score) of lowest mean |w - w_hat|^norm,
    and (scale, zero) are rebuilt from it as the reference does. Symmetric: half-ranges
    max(|lo|, hi) * i / num, scale = max(half / 2^(b-1), 1e-8)."""
    x = weight.float()
    maxq = 2**bits - 1
    half_levels = 2 ** (bits - 1)  # -minq of the signed symmetric grid
    eps = torch.tensor(1e-8, device=x.device)
    zero_ = torch.zeros(x.shape[0], device=x.device)
    lo = torch.minimum(x.min(dim=1).values, zero_)
    hi = torch.maximum(x.max(dim=1).values, zero_)
    if not mse:
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            hi = torch.where((lo == 0) & (hi == 0), torch.ones_like(hi), hi)
            return hi / half_levels, torch.full_like(hi, half_levels)
        return _fit_gptq_minmax(x, Grid(bits, sym=False, zero_in_range=True))
    best_score = torch.full_like(lo, 1e10)
    if sym:
        full = torch.maximum(lo.abs(), hi)
        best_hi = hi.clone()
        for i in range(1, num + 1):
            cand = full / num * i
            scale = torch.maximum(cand / half_levels, eps)[:, None]
            x_q = scale * torch.clamp(torch.round(x / scale), -half_levels, half_levels - 1)
            score = (x - x_q).abs_().pow_(norm).mean(dim=1)
            best_hi = torch.where(score < best_score, cand, best_hi)
            best_score = torch.minimum(score, best_score)
        scale = torch.maximum(torch.clamp(best_hi, min=0) / half_levels, eps)
        return scale, torch.full_like(scale, half_levels)
    width = hi - lo
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(1, num + 1):
        cand_hi = width / num * i
        delta = torch.maximum(cand_hi / maxq, eps)
        scale = delta[:, None]
        x_round = torch.round(x / scale)
        for zp in range(maxq + 1):
            new_lo = zero_ - zp * delta
            new_hi = cand_hi - zp * delta
            zero = torch.clamp(-torch.round(new_lo / delta), 0, maxq)[:, None]
            x_q = scale * (torch.clamp(x_round + zero, 0, maxq) - zero)
            score = (x - x_q).abs_().pow_(norm).mean(dim=1)
            better = score < best_score
            best_lo = torch.where(better, new_lo, best_lo)
            best_hi = torch.where(better, new_hi, best_hi)
            best_score = torch.minimum(best_score, score)
    lo_, hi_ = torch.clamp(best_lo, max=0), torch.clamp(best_hi, min=0)
    scale = torch.maximum((hi_ - lo_) / maxq, eps)
    zero = torch.clamp(-torch.round(lo_ / scale), 0, maxq)
    return scale, zero
