"""Round-to-nearest, in both of the literature's definitions (reference/methods.md §2).

- GPTQ-repo RTN: `zero_in_range=True, group_size=-1` (per output channel, range forced to hold 0).
- AWQ-paper RTN: `zero_in_range=False, group_size=128` (raw min-max per group of 128 columns).
- Per tensor (`per_tensor=True`, group_size -1): one grid fitted to the whole matrix, its (scale,
  zero) stored once (kernels/uniform.py), the weight side of per-tensor W8A8.
Their numbers are not interchangeable; every result records which one ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from quantlab.kernels import QuantizedWeight
from quantlab.kernels.groups import contiguous_g_idx, segments
from quantlab.methods import quantizer
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView


@dataclass
class RTNConfig(MethodConfig):
    sym: bool = False
    zero_in_range: bool = False
    float_zero: bool = False
    per_tensor: bool = False

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.per_tensor and self.group_size != -1:
            raise ConfigError(
                f"method {method_name!r}: per_tensor=true is one grid for the whole matrix; it needs "
                f"group_size=-1, got {self.group_size}"
            )
        if self.float_zero and (self.sym or self.zero_in_range):
            raise ConfigError(
                f"method {method_name!r}: float_zero=true needs sym=false and zero_in_range=false "
                "(a floating zero-point is a raw min-max asymmetric grid)"
            )

    def grid(self) -> quantizer.Grid:
        return quantizer.Grid(self.bits, self.sym, self.zero_in_range, self.float_zero)


def fit_groups(w: torch.Tensor, grid: quantizer.Grid, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of shape [out, n_groups]: each run of equal-width groups (the full groups,
    then a shorter last one) in one batched fit."""
    rows = w.shape[0]
    scales, zeros = [], []
    for seg in segments(w.shape[1], group_size):
        scale, zero = quantizer.fit(seg.reshape(w).reshape(rows * seg.n_groups, seg.group_width), grid)
        scales.append(scale.view(rows, seg.n_groups))
        zeros.append(zero.view(rows, seg.n_groups))
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def round_to_nearest(
    weight: torch.Tensor, grid: quantizer.Grid, group_size: int, per_tensor: bool = False
) -> QuantizedWeight:
    """Quantize a [out, in] weight group by group; the last group may be shorter. `per_tensor`
    (group_size -1): one (scale, zero) fitted to the whole matrix, repeated on every row."""
    w = weight.detach().float()
    if per_tensor:
        if group_size != -1:
            raise ValueError(f"per_tensor needs group_size -1, got {group_size}")
        scale, zero = quantizer.fit(w.reshape(1, -1), grid)
        scales, zeros = scale.expand(w.shape[0], 1).clone(), zero.expand(w.shape[0], 1).clone()
    else:
        scales, zeros = fit_groups(w, grid, group_size)
    g_idx = contiguous_g_idx(w.shape[1], group_size)
    index = g_idx.long().to(w.device)
    codes = quantizer.quantize(w, scales[:, index], zeros[:, index], grid.maxq, grid.float_zero)
    return QuantizedWeight(
        codes=codes.to(torch.uint8 if grid.bits <= 8 else torch.int16),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        bits=grid.bits,
        group_size=group_size,
        zero_format=grid.zero_format,
        per_tensor=per_tensor,
    )


@register("rtn")
class RTN(Method):
    config_class = RTNConfig
    needs_calibration = False

    def quantize_block(self, block: BlockView) -> None:
        grid = self.config.grid()
        for name, linear in block.linears.items():
            start = time.perf_counter()
            qweight = round_to_nearest(linear.weight, grid, self.config.group_size, self.config.per_tensor)
            block.commit(name, qweight, seconds=time.perf_counter() - start)
