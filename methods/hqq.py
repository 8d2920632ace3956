"""Half-Quadratic Quantization (HQQ; Badri & Shaji, 2023), data-free: `method=hqq`.

HQQ keeps the asymmetric min-max grid of each group of `group_size` weights (HQQ's axis=1: runs
of consecutive weights along a row) and fits its zero-point by a proximal solver of the sparsity-
promoting loss ||W - Q^-1(Q(W))||_p^p, p = `lp_norm` < 1, instead of minimizing the squared error.
With s the *inverse* scale (HQQ works with W * s + z) and z the float zero-point of a group:

    W_q = clamp(round(W * s + z), 0, 2^b - 1)          quantize
    W_r = (W_q - z) / s                                  dequantize
    W_e = shrink_p(W - W_r, beta)                        the sparse error: sign(x) relu(|x| - |x|^(p-1) / beta)
    z   = mean over the group of (W_q - (W - W_e) * s)   the closed-form zero update

repeated up to `iters` times while the mean |W - W_r| over the whole matrix keeps falling
(reference: hqq/core/optimize.py `optimize_weights_proximal_legacy`, HQQ's default optimizer, and
hqq/core/quantize.py `Quantizer.quantize`, at mobiusml/hqq e0b1d00). Start: s = (2^b - 1) / (max - min)
(1 where max - min <= 1e-4, clamped at 2e4), z = -min * s, rounded at 4 bits only (BaseQuantizeConfig's
round_zero). The stored weight is scale = 1 / s and the float zero z: a UniformWeight with
zero_format "float", W = scale * (code - zero), fp16 scale and zero in storage as in HQQ's meta.

Reference quirks kept: the loop stops on the first iteration whose error did not fall, *after* that
iteration's zero update, and the final codes use that last zero; the default optimizer never
applies its `kappa` (beta stays 10), so `kappa` defaults to 1 here (kappa > 1 multiplies beta after
every iteration, as HQQ's v2 optimizer and the paper do). Only axis=1 is implemented: HQQ's axis=0
groups weights across output rows (it reshapes W to [group_size, -1]), which groups along a row
cannot store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantlab.kernels import UniformWeight
from quantlab.kernels.groups import contiguous_g_idx
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView


@dataclass
class HQQConfig(MethodConfig):
    bits: int = 4
    group_size: int = 64  # HQQ's default; runs of group_size weights within a row
    optimize: bool = True  # false: the plain min-max grid HQQ starts from (no solver)
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.0  # HQQ's default optimizer keeps beta fixed (module docstring)
    round_zero: bool | None = None  # null: HQQ's default, rounded initial zero at 4 bits only

    supported_bits: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 8)  # hqq's Quantizer.SUPPORTED_BITS

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.group_size == -1 or self.group_size % 8:
            raise ConfigError(
                f"method {method_name!r}: group_size={self.group_size} is invalid; HQQ needs a multiple of 8 "
                "(its default is 64; set method.group_size)"
            )
        if self.iters < 1:
            raise ConfigError(f"method {method_name!r}: iters={self.iters} must be at least 1 (HQQ's default: 20)")
        if not 0.1 <= self.lp_norm <= 1:
            raise ConfigError(f"method {method_name!r}: lp_norm={self.lp_norm} must lie in [0.1, 1] (HQQ's default: 0.7)")
        if self.beta <= 0:
            raise ConfigError(f"method {method_name!r}: beta={self.beta} must be positive (HQQ's default: 10)")
        if self.kappa < 1:
            raise ConfigError(f"method {method_name!r}: kappa={self.kappa} must be at least 1 (1: beta fixed)")

    def rounds_zero(self) -> bool:
        return self.bits == 4 if self.round_zero is None else self.round_zero


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """HQQ's generalized soft-thresholding: sign(x) * relu(|x| - |x|^(p-1) / beta) (p = 1: |x| - 1 / beta)."""
    out = torch.abs(x)
    if lp_norm == 1:
        out.sub_(1.0 / beta).clamp_min_(0.0)
    else:
        out.sub_((1.0 / beta) * out.pow(lp_norm - 1)).clamp_min_(0.0)
    return out.mul_(torch.sign(x))


def optimize_zero(
    w: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, maxq: int, config: HQQConfig
) -> tuple[torch.Tensor, int]:
    """The proximal zero-point solver on groups w [n_groups, group_size] (fp32); returns the final
    zero [n_groups, 1] and the number of iterations run."""
    beta = config.beta
    best_error = torch.tensor(torch.inf)
    done = 0
    for _ in range(config.iters):
        done += 1
        w_q = torch.round(w * inv_scale + zero).clamp_(0, maxq)
        w_r = (w_q - zero) / inv_scale
        w_e = shrink_lp(w - w_r, beta, config.lp_norm)
        zero = torch.mean(w_q - (w - w_e) * inv_scale, dim=1, keepdim=True)
        beta *= config.kappa
        error = torch.abs(w - w_r).mean().float()
        if error < best_error:
            best_error = error
        else:
            break  # HQQ keeps this iteration's zero update
    return zero, done


def hqq_quantize(weight: torch.Tensor, config: HQQConfig) -> UniformWeight:
    """A [out, in] weight quantized by HQQ (axis=1) as a UniformWeight with float zero-points."""
    out_features, in_features = weight.shape
    group_size = config.group_size
    if in_features % group_size:
        raise ValueError(
            f"HQQ groups runs of group_size={group_size} weights within a row, but this linear has "
            f"in_features={in_features}, not a multiple of it; use a group size that divides it (e.g. "
            "method.group_size=64 or 32)"
        )
    maxq = 2**config.bits - 1
    w = weight.detach().float().reshape(-1, group_size)
    lo = w.min(dim=1, keepdim=True)[0]
    hi = w.max(dim=1, keepdim=True)[0]
    denom = hi - lo
    inv_scale = maxq / denom
    inv_scale = torch.where(denom.abs() <= 1e-4, torch.full_like(inv_scale, 1.0), inv_scale).clamp(max=2e4)
    zero = -lo * inv_scale
    if config.rounds_zero():
        zero = torch.round(zero)
    iterations = 0
    if config.optimize:
        zero, iterations = optimize_zero(w, inv_scale, zero, maxq, config)
    codes = torch.round(w * inv_scale + zero).clamp_(0, maxq)
    n_groups = in_features // group_size
    return UniformWeight(
        codes=codes.reshape(out_features, in_features).to(torch.uint8),
        scales=(1.0 / inv_scale).reshape(out_features, n_groups),
        zeros=zero.reshape(out_features, n_groups),
        g_idx=contiguous_g_idx(in_features, group_size, device=weight.device),
        bits=config.bits,
        group_size=group_size,
        zero_format="float",
        info={"iterations": iterations},
    )


@register("hqq")
class HQQ(Method):
    config_class = HQQConfig
    needs_calibration = False

    def quantize_block(self, block: BlockView) -> None:
        for name, linear in block.linears.items():
            start = time.perf_counter()
            qweight = hqq_quantize(linear.weight, self.config)
            block.commit(name, qweight, seconds=time.perf_counter() - start,
                         iterations=qweight.info["iterations"])
