"""AWQ's three searches as pure tensor math (reference/methods.md §4; llm-awq auto_scale.py, auto_clip.py).

- `pseudo_quantize`: the raw min-max asymmetric grid of AWQ (no forced zero; the zero-point is an
  integer clamped to [0, 2^b - 1]), per (row, group). A width that is not a multiple of the group
  size gets a shorter last group; groups never run across rows (llm-awq's `view(-1, group)` would,
  and AutoAWQ asserts).
- `candidate_scales` / `search_group_scales`: the per-input-channel scale s = x_mean^alpha (or
  AutoAWQ's "duo" x_mean^alpha / w_mean^(1 - alpha)), normalized by sqrt(max(s) min(s)), on the
  grid alpha = r / n_grid, r = 0 .. n_grid - 1; the loss is the mean squared difference of the
  inspected module's output, in fp32, and the first alpha with the lowest loss wins.
- `fold_scales`: the exact transform: the op before the group absorbs 1 / s, the group's columns s.
- `clip_search`: per (row, group) the clamp [-m, m], m = (1 - k / n_grid) max|w|, k < max_shrink n_grid,
  with the lowest error of the group's partial dot products on about 512 tokens.

Deviation: scales, fake-quantized weights and losses are computed in fp32 even for an fp16 model
(the reference stays in the model's dtype until the loss); the candidate weight is cast back to the
model's dtype before the inspected module runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from quantlab.kernels.groups import contiguous_g_idx, segments
from quantlab.methods import quantizer
from quantlab.methods.block import ModuleCall
from quantlab.methods.rtn import fit_groups

SCALE_FLOOR = 1e-4  # the clamp on s before normalization, in both references
DUO_EPS = 1e-4  # AutoAWQ: x^a / (w^(1-a) + 1e-4)
WEIGHT_MAX_EPS = 1e-6  # AutoAWQ: |w| / (max|w| + 1e-6) per group


def awq_grid(bits: int) -> quantizer.Grid:
    """AWQ's `pseudo_quantize_tensor` with zero_point=True (the only mode llm-awq uses)."""
    return quantizer.Grid(bits, sym=False, zero_in_range=False)


def _fake_quantize_last_dim(w: torch.Tensor, grid: quantizer.Grid) -> torch.Tensor:
    """Fake-quantize `w` [..., G] with one grid per slice along the last dimension."""
    flat = w.reshape(-1, w.shape[-1])
    scale, zero = quantizer.fit(flat, grid)
    return quantizer.fake_quantize(flat, scale[:, None], zero[:, None], grid.maxq).view_as(w)


def pseudo_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The fp32 fake-quant weight of `weight` [out, in], groups of `group_size` along each row
    (RTN's group fit, so a shorter last group is handled the same way)."""
    w = weight.float()
    grid = awq_grid(bits)
    scales, zeros = fit_groups(w, grid, group_size)
    index = contiguous_g_idx(w.shape[1], group_size).long().to(w.device)
    return quantizer.fake_quantize(w, scales[:, index], zeros[:, index], grid.maxq)


def activation_mean(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean |x| per input channel over every token of every chunk (llm-awq `get_act_scale`)."""
    total, count = None, 0
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1])
        part = flat.abs().float().sum(dim=0)
        total = part if total is None else total + part
        count += flat.shape[0]
    if total is None or count == 0:
        raise ValueError("no calibration tokens reached this group")
    return total / count


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's w_mean: the group's weights stacked by rows, |w| / (max|w| + 1e-6) with the max
    per (row, group), averaged over rows, per input channel."""
    w = torch.cat([weight.float() for weight in weights], dim=0).abs()
    normalized = torch.empty_like(w)
    for seg in segments(w.shape[1], group_size):
        blocks = seg.reshape(w)
        normalized[:, seg.start : seg.end] = (blocks / (blocks.amax(dim=-1, keepdim=True) + WEIGHT_MAX_EPS)).reshape(
            w.shape[0], seg.end - seg.start
        )
    return normalized.mean(dim=0)


def alpha_grid(n_grid: int) -> list[float]:
    """alpha = r / n_grid for r = 0 .. n_grid - 1: 20 points in [0, 0.95] in the reference."""
    return [r / n_grid for r in range(n_grid)]


def candidate_scales(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s for one alpha: llm-awq's x_mean^alpha, or AutoAWQ's duo formula when `w_mean` is given;
    clamped at 1e-4, normalized so that max(s) * min(s) = 1, non-finite entries set to 1 (AutoAWQ)."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=SCALE_FLOOR)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + DUO_EPS)).clamp(min=SCALE_FLOOR)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@dataclass
class ScaleSearch:
    alpha: float
    loss: float
    scales: torch.Tensor  # [in_features], fp32
    losses: list[float] = field(default_factory=list)  # per alpha, in grid order


def block_output_loss(
    module: nn.Module, calls: Sequence[ModuleCall], targets: Sequence[torch.Tensor]
) -> float:
    """Mean over every output element of (target - module(call))^2, summed in fp32 across chunks:
    the reference's mean over one batch holding every calibration sequence."""
    total, count = 0.0, 0
    for call, target in zip(calls, targets):
        out = call.replay(module)
        total += float((target.float() - out.float()).pow(2).sum())
        count += target.numel()
    return total / count


@torch.no_grad()
def search_group_scales(
    module: nn.Module,
    calls: Sequence[ModuleCall],
    linears: Sequence[nn.Linear],
    x_mean: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    w_mean: torch.Tensor | None = None,
) -> ScaleSearch:
    """Try every alpha: W <- Q(W diag(s)) diag(s)^-1 for each linear of the group, run `module` on
    its recorded calls, compare with its unmodified output; the weights are restored afterwards."""
    targets = [call.replay(module) for call in calls]
    originals = [linear.weight.data.clone() for linear in linears]
    best: ScaleSearch | None = None
    losses = []
    try:
        for alpha in alpha_grid(n_grid):
            s = candidate_scales(x_mean, alpha, w_mean)
            for linear, original in zip(linears, originals):
                s_row = s.to(original.device)[None, :]
                candidate = pseudo_quantize(original.float() * s_row, bits, group_size) / s_row
                linear.weight.data.copy_(candidate.to(original.dtype))
            loss = block_output_loss(module, calls, targets)
            losses.append(loss)
            if best is None or loss < best.loss:  # strict: ties keep the smaller alpha, as the reference
                best = ScaleSearch(alpha, loss, s)
            for linear, original in zip(linears, originals):
                linear.weight.data.copy_(original)
    finally:
        for linear, original in zip(linears, originals):
            linear.weight.data.copy_(original)
    assert best is not None
    best.losses = losses
    return best


@torch.no_grad()
def fold_scales(prev_op: nn.Module, linears: Sequence[nn.Linear], scales: torch.Tensor) -> None:
    """Divide what `prev_op` outputs by s and multiply the linears' input columns by s, so that the
    block computes the same function (llm-awq `apply_scale`). A norm divides its weight and bias;
    a linear divides its last len(s) output rows and their bias (llm-awq `scale_fc_fc`)."""
    n = scales.numel()
    if isinstance(prev_op, nn.Linear):
        if prev_op.out_features < n:
            raise ValueError(f"cannot fold {n} scales into a linear with {prev_op.out_features} outputs")
        s = scales.to(prev_op.weight.device)
        prev_op.weight.data[-n:] = (prev_op.weight.data[-n:].float() / s[:, None]).to(prev_op.weight.dtype)
        if prev_op.bias is not None:
            prev_op.bias.data[-n:] = (prev_op.bias.data[-n:].float() / s).to(prev_op.bias.dtype)
    else:
        weight = getattr(prev_op, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != (n,):
            raise ValueError(
                f"cannot fold scales into {type(prev_op).__name__}: it needs a per-channel weight of {n} entries "
                "(a LayerNorm or RMSNorm)"
            )
        s = scales.to(weight.device)
        weight.data = (weight.data.float() / s).to(weight.dtype)
        bias = getattr(prev_op, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = (bias.data.float() / s).to(bias.dtype)
    for linear in linears:
        if linear.in_features != n:
            raise ValueError(f"a linear with {linear.in_features} inputs cannot take {n} scales")
        s = scales.to(linear.weight.device)
        linear.weight.data = (linear.weight.data.float() * s[None, :]).to(linear.weight.dtype)


def subsample_tokens(inputs: Sequence[torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Every stride-th token of all chunks flattened in order, stride = max(1, total // n_tokens)
    (llm-awq auto_clip: `input_feat[:, 0::n_tok // 512]`), as fp32 [tokens, features]."""
    total = sum(x.numel() // x.shape[-1] for x in inputs)
    stride = max(1, total // n_tokens)
    parts, offset = [], 0
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1])
        start = (-offset) % stride  # the first global index in this chunk that is a multiple of stride
        parts.append(flat[start::stride].float())
        offset += flat.shape[0]
    return torch.cat(parts, dim=0)


@dataclass
class ClipSearch:
    max_val: torch.Tensor  # [out, n_groups]: clamp each (row, group) to [-max_val, max_val]
    shrink: torch.Tensor  # [out, n_groups]: the chosen k / n_grid (0: not clipped)
    err: torch.Tensor  # [out, n_groups]: the clip objective at the chosen clamp
    err_unclipped: torch.Tensor  # [out, n_groups]: the objective without clipping (k = 0)


@torch.no_grad()
def clip_search(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    row_chunk: int = 256,
) -> ClipSearch:
    """Per (row, group), the clamp minimizing mean over tokens of (sum_g x_g Q(clamp(w_g)) - sum_g x_g w_g)^2,
    the partial dot product over the group's columns (llm-awq `auto_clip_layer`). `x` [tokens, in]
    are the (already subsampled, already scale-divided) input features; rows go in chunks of
    `row_chunk`, which changes memory only."""
    w_all = weight.float()
    x = x.float().to(w_all.device)
    grid = awq_grid(bits)
    results: list[list[torch.Tensor]] = [[], [], [], []]
    for seg in segments(w_all.shape[1], group_size):
        x_seg = seg.reshape(x)  # [T, nG, G]
        seg_out = [[], [], [], []]
        for r0 in range(0, w_all.shape[0], row_chunk):
            w = seg.reshape(w_all[r0 : r0 + row_chunk])  # [c, nG, G]
            target = torch.einsum("tng,cng->ctn", x_seg, w)
            m0 = w.abs().amax(dim=-1, keepdim=True)  # [c, nG, 1]
            best_err = torch.full(m0.shape[:2], float("inf"), device=w.device)
            best_m = m0[..., 0].clone()
            best_k = torch.zeros_like(best_err)
            unclipped = None
            for k in range(int(max_shrink * n_grid)):
                m = m0 * (1 - k / n_grid)
                q = _fake_quantize_last_dim(torch.clamp(w, -m, m), grid)
                err = (torch.einsum("tng,cng->ctn", x_seg, q) - target).pow(2).mean(dim=1)  # [c, nG]
                if k == 0:
                    unclipped = err
                better = err < best_err  # strict, as the reference
                best_err = torch.where(better, err, best_err)
                best_m = torch.where(better, m[..., 0], best_m)
                best_k = torch.where(better, torch.full_like(best_k, k / n_grid), best_k)
            for bucket, value in zip(seg_out, (best_m, best_k, best_err, unclipped)):
                bucket.append(value)
        for bucket, values in zip(results, seg_out):
            bucket.append(torch.cat(values, dim=0))
    max_val, shrink, err, unclipped = (torch.cat(parts, dim=1) for parts in results)
    return ClipSearch(max_val, shrink, err, unclipped)


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    """`weight` [out, in] clamped symmetrically to [-max_val, max_val] of each column's group,
    although the grid is asymmetric (as the reference does)."""
    index = contiguous_g_idx(weight.shape[1], group_size).long().to(weight.device)
    m = max_val.to(weight.device)[:, index]
    return torch.clamp(weight.float(), -m, m)
