"""Round-to-nearest, in both of the literature's definitions (reference/methods.md §2).

- GPTQ-repo RTN: `zero_in_range=True, group_size=-1` (per output channel, range forced to hold 0).
- AWQ-paper RTN: `zero_in_range=False, group_size=128` (raw min-max per group of 128 columns).
Their numbers are not interchangeable; every result records which one ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kernels import QuantizedWeight
from kernels.quantized_weight import contiguous_g_idx
from methods import quantizer
from methods.base import ConfigError, Method, MethodConfig, register
from methods.block import BlockView


@dataclass
class RTNConfig(MethodConfig):
    sym: bool = False
    zero_in_range: bool = False
    float_zero: bool = False

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.float_zero and (self.sym or self.zero_in_range):
            raise ConfigError(
                f"method {method_name!r}: float_zero=true needs sym=false and zero_in_range=false "
                "(a floating zero-point is a raw min-max asymmetric grid)"
            )

    def grid(self) -> quantizer.Grid:
        return quantizer.Grid(self.bits, self.sym, self.zero_in_range, self.float_zero)


def fit_groups(w: torch.Tensor, grid: quantizer.Grid, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of shape [out, n_groups]: the full groups in one batched fit, then the
    shorter last group when group_size does not divide the input width."""
    out_features, in_features = w.shape
    if group_size == -1:
        scale, zero = quantizer.fit(w, grid)
        return scale[:, None], zero[:, None]
    n_full = in_features // group_size
    scales, zeros = [], []
    if n_full:
        full = w[:, : n_full * group_size].reshape(out_features * n_full, group_size)
        scale, zero = quantizer.fit(full, grid)
        scales.append(scale.view(out_features, n_full))
        zeros.append(zero.view(out_features, n_full))
    if n_full * group_size < in_features:
        scale, zero = quantizer.fit(w[:, n_full * group_size :], grid)
        scales.append(scale[:, None])
        zeros.append(zero[:, None])
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def round_to_nearest(weight: torch.Tensor, grid: quantizer.Grid, group_size: int) -> QuantizedWeight:
    """Quantize a [out, in] weight group by group; the last group may be shorter."""
    w = weight.detach().float()
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
    )


@register("rtn")
class RTN(Method):
    config_class = RTNConfig
    needs_calibration = False

    def quantize_block(self, block: BlockView) -> None:
        grid = self.config.grid()
        for name, linear in block.linears.items():
            start = time.perf_counter()
            qweight = round_to_nearest(linear.weight, grid, self.config.group_size)
            block.commit(name, qweight, seconds=time.perf_counter() - start)
