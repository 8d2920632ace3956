"""Grid fitting searches beyond plain min-max (reference/methods.md §1.3).

The grids themselves (`Grid`, the min-max fits, quantize / dequantize / fake_quantize) live in
kernels/grid.py, shared with activation quantization at run time; they are re-exported here, where
the methods have always found them. This module adds the per-row searches:

- GPTQ MSE clip search (`fit_mse`, the GPTQ grid only): shrink the min-max range and keep the scale
  with the lowest L2.4 error per row.
- OWQ's quantizer (`fit_owq`): its own min-max and grid search.
"""

from __future__ import annotations

import torch

from quantlab.kernels.grid import (
    Grid,
    dequantize,
    fake_quantize,
    fit,
    gptq_params,
    gptq_range,
    quantize,
    range_params,
    row_range,
)

__all__ = ["Grid", "dequantize", "fake_quantize", "fit", "fit_mse", "fit_owq", "quantize", "range_params", "row_range"]


def _row_gptq_range(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max range of each row of `w` [rows, cols]."""
    return gptq_range(*row_range(w), grid)


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
    lo, hi = _row_gptq_range(w, grid)
    scale, zero = gptq_params(lo, hi, grid)
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
        return fit(x, Grid(bits, sym=False, zero_in_range=True))
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
