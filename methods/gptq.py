"""GPTQ (Frantar et al., ICLR'23), step for step as IST-DASLab/gptq `fasterquant` (reference/methods.md §3).

The paper's symbols, as named here: W [C_out, C_in] is the layer weight (`weight`); H = 2 X X^T the
Hessian of the layer-wise loss ||W X - Q X||^2 over calibration inputs X (`hessian`, see
methods/hessian.py); lambda the relative dampening (`damp`: H + lambda * mean(diag H) * I);
U = chol(H^-1)^T, the upper Cholesky factor of H^-1 (`inv_hessian_chol`), whose row c carries the
OBS update that spreads column c's error onto the columns not yet quantized and whose diagonal
U_cc = sqrt([H_F^-1]_cc) scales that error; B the lazy-batch width (`block_size`); G the group size
(`group_size`); E the scaled errors (w - q) / U_cc of one lazy batch (`errors`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kernels import QuantizedWeight
from methods import quantizer
from methods.base import ConfigError, Method, MethodConfig, register
from methods.block import BlockView
from methods.hessian import HessianAccumulator, collect_hessians, input_representatives

log = logging.getLogger(__name__)


FitFn = Callable[[torch.Tensor, quantizer.Grid], tuple[torch.Tensor, torch.Tensor]]


class HessianNotPositiveDefinite(RuntimeError):
    """Cholesky of the damped Hessian failed even after the allowed damping retries."""


@dataclass
class GPTQConfig(MethodConfig):
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01  # percdamp
    block_size: int = 128
    true_sequential: bool | None = None  # None: the block family's default (llama-like on, OPT off)
    mse: bool = False
    max_damp_retries: int = 5  # GPTQModel-style: on Cholesky failure, damp += damp_auto_increment
    damp_auto_increment: float = 0.0025
    supported_bits = (2, 3, 4, 8)

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.block_size < 1:
            raise ConfigError(
                f"method {method_name!r}: block_size={self.block_size} must be >= 1 (128 in the reference)"
            )
        if not self.damp > 0:
            raise ConfigError(f"method {method_name!r}: damp={self.damp} must be > 0 (0.01 in the reference)")
        if self.static_groups and self.group_size == -1:
            raise ConfigError(
                f"method {method_name!r}: static_groups=true needs groups; set group_size (e.g. 128), not -1"
            )
        if self.max_damp_retries < 0 or (self.max_damp_retries > 0 and not self.damp_auto_increment > 0):
            raise ConfigError(
                f"method {method_name!r}: max_damp_retries must be >= 0, damp_auto_increment > 0"
            )

    def grid(self) -> quantizer.Grid:
        return quantizer.Grid(self.bits, sym=self.sym, zero_in_range=True)

    def solver_options(self) -> dict:
        names = ("group_size", "block_size", "damp", "act_order", "static_groups", "mse")
        names += ("max_damp_retries", "damp_auto_increment")
        return {name: getattr(self, name) for name in names}


def inverse_hessian_chol(
    hessian: torch.Tensor, damp: float, max_retries: int = 0, increment: float = 0.0025
) -> tuple[torch.Tensor, float, int]:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1 (steps 5-6), retrying with a larger damp."""
    mean_diag = torch.mean(torch.diag(hessian))
    for retry in range(max_retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, damp, retry
        if retry < max_retries:
            log.warning("GPTQ: Cholesky failed at damp=%g, retrying with %g", damp, damp + increment)
            damp += increment
    raise HessianNotPositiveDefinite(
        f"Cholesky of the damped Hessian failed at damp={damp:g} after {max_retries} retries; raise damp "
        "(0.1 is common), use more calibration samples, or raise max_damp_retries"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: quantizer.Grid,
    group_size: int = -1,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool = False,
    max_damp_retries: int = 0,
    damp_auto_increment: float = 0.0025,
    *,
    order: torch.Tensor | None = None,
    n_full_precision: int = 0,
    fit_fn: FitFn | None = None,
    group_fit_fn: FitFn | None = None,
) -> tuple[QuantizedWeight, dict]:
    """Quantize `weight` [out, in] against `hessian` [in, in]; returns the weight and its record.

    OWQ's extensions (reference/methods.md §5.3; the defaults leave GPTQ untouched): `order` is an
    explicit column order that replaces act-order's; the solver then quantizes only the first
    in - `n_full_precision` columns of it, while its lazy updates still reach the trailing ones,
    which are returned in fp16 as `outlier_values` holding their error-compensated values.
    `fit_fn(W, grid)` fits the per-row (scale, zero) on the quantized columns, `group_fit_fn` each
    group (default: GPTQ's min-max, or its clip search with `mse`)."""
    if static_groups and group_size == -1:
        raise ValueError("static_groups needs group_size != -1")
    if order is not None and (act_order or static_groups):
        raise ValueError("an explicit column order replaces act_order and cannot use static_groups")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    n_cols = W.shape[1]
    n_quant = n_cols - n_full_precision
    if not 0 <= n_full_precision < n_cols:
        raise ValueError(f"n_full_precision={n_full_precision} must leave at least one of {n_cols} columns")
    fit = fit_fn or (quantizer.fit_mse if mse else quantizer.fit)
    group_fit = group_fit_fn or fit
    G = group_size if group_size != -1 else n_cols
    bounds = quantizer.group_bounds(n_quant, group_size)
    scales = torch.zeros(W.shape[0], len(bounds), device=W.device)
    zeros = torch.zeros_like(scales)
    if order is not None:  # OWQ permutes first, then fits on the columns it will quantize
        W, H = W[:, order], H[order][:, order]
    # 1. Per-row parameters for group_size = -1, fitted before the dead columns are zeroed (as the reference).
    if group_size == -1:
        scales[:, 0], zeros[:, 0] = fit(W[:, :n_quant], grid)
    # 2. Inputs that never fire: their weights cannot matter; H_jj = 1 keeps H invertible.
    dead = torch.diag(H) == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    # 3. Static groups: fitted on the original column order, before any permutation.
    if static_groups:
        for g, (start, end) in enumerate(bounds):
            scales[:, g], zeros[:, g] = fit(W[:, start:end], grid)
    # 4. Act-order: largest diag(H) first.
    if order is not None:
        perm = order.to(W.device)
    else:
        perm = (
            torch.argsort(torch.diag(H), descending=True)
            if act_order
            else torch.arange(n_cols, device=W.device)
        )
        if act_order:
            W, H = W[:, perm], H[perm][:, perm]
    # 5-6. Damping and U.
    inv_hessian_chol, damp_used, retries = inverse_hessian_chol(
        H, damp, max_damp_retries, damp_auto_increment
    )
    del H
    # 7. Lazy batches: exact OBS updates inside [i1, i2), one matmul for everything to the right.
    Q, codes, losses = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(W)
    original_column = perm.tolist()
    for i1 in range(0, n_quant, block_size):
        i2 = min(i1 + block_size, n_quant)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        U1 = inv_hessian_chol[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if static_groups:
                g = original_column[c] // G
            else:
                g = c // G  # the group of a permuted position (all 0 when group_size = -1)
                if group_size != -1 and c % G == 0:
                    # Quirk (reference/methods.md §3.1, §11.13): the group is fitted on the *global* W,
                    # which lacks the in-block updates (they live in W1), so a group that starts
                    # mid-block (G < B, e.g. 32 or 64) is fitted on stale weights. G = B = 128: no effect.
                    scales[:, g], zeros[:, g] = group_fit(W[:, c : min(c + G, n_quant)], grid)
            w, d = W1[:, i], U1[i, i]
            code = quantizer.quantize(w, scales[:, g], zeros[:, g], grid.maxq)
            q = quantizer.dequantize(code, scales[:, g], zeros[:, g])
            codes[:, c], Q[:, c] = code, q
            losses[:, c] = (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            errors[:, i] = err
        W[:, i2:] -= errors @ inv_hessian_chol[i1:i2, i2:]  # reaches the full-precision columns too
    # 8. Back to the original column order; g_idx per AutoGPTQ (reference/methods.md §3.4).
    invperm = torch.argsort(perm)
    if static_groups or (not act_order and order is None):
        g_idx = torch.arange(n_cols, device=W.device) // G
    else:
        g_idx = invperm // G  # column j sat at position invperm[j]
    outliers = {}
    if n_full_precision:
        kept = perm[n_quant:]
        g_idx[kept] = 0  # they carry no codes; the packed reference stores the zero-point there
        codes[:, n_quant:] = zeros[:, :1]
        outliers = {"outlier_idx": kept.to(torch.int32), "outlier_values": W[:, n_quant:].to(torch.float16)}
    qweight = QuantizedWeight(
        codes=codes[:, invperm].to(torch.uint8 if grid.bits <= 8 else torch.int16),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        bits=grid.bits,
        group_size=group_size,
        zero_format=grid.zero_format,
        **outliers,
    )
    info = {
        "damp": damp_used,
        "damp_retries": retries,
        "dead_columns": int(dead.sum()),
        "loss": float(losses.sum()),
    }
    return qweight, info


@contextmanager
def tf32_disabled():
    """All references run with TF32 off; restore the caller's settings afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@register("gptq")
class GPTQ(Method):
    """Per linear, the record gets: damp (the relative lambda used), damp_retries, dead_columns, loss
    (the reference's sum of Losses), hessian_sequences, hessian_from, and its share of the time:
    forward_seconds (running the block to this group), hessian_seconds, solver_seconds."""

    config_class = GPTQConfig

    @torch.no_grad()
    def quantize_block(self, block: BlockView) -> None:
        cfg = self.config
        order = list(block.linears)
        true_sequential = (
            block.true_sequential_default if cfg.true_sequential is None else cfg.true_sequential
        )
        groups = [list(group) for group in block.sequential_groups] if true_sequential else [order]
        if sorted(name for group in groups for name in group) != sorted(order):
            raise ValueError(
                f"{block.name}: sequential groups {groups} do not cover the linears {order} exactly once"
            )
        representative = input_representatives(block)
        with tf32_disabled():
            for group in groups:
                # One pass per group, stopped once its inputs are seen; the inputs already carry the
                # quantized weights of the earlier groups (§3.2). Linears sharing an input share a
                # Hessian: the reference builds q/k/v's three times over.
                hessians, timing = collect_hessians(block, group, last_pass=group is groups[-1])
                _sync(block.linears[group[0]].weight.device)
                # The pass serves the whole group: each linear is charged an equal share.
                share = {key: seconds / len(group) for key, seconds in timing.items()}
                for name in group:
                    self._solve_and_commit(block, name, hessians[name], share, representative[name])

    def solve(self, block: BlockView, name: str, hessian: torch.Tensor) -> tuple[QuantizedWeight, dict]:
        """One linear against its Hessian; variants of GPTQ (OWQ) override only this."""
        return gptq_quantize(block.linears[name].weight, hessian, self.config.grid(), **self.config.solver_options())

    def _solve_and_commit(
        self, block: BlockView, name: str, acc: HessianAccumulator, timing: dict[str, float], owner: str
    ) -> None:
        linear = block.linears[name]
        if acc.n_sequences == 0:
            raise RuntimeError(f"{block.name}.{name}: no calibration input reached this linear")
        start = time.perf_counter()
        try:
            qweight, info = self.solve(block, name, acc.hessian)
        except HessianNotPositiveDefinite as exc:
            raise HessianNotPositiveDefinite(f"{block.name}.{name}: {exc}") from None
        _sync(linear.weight.device)
        solver_seconds = time.perf_counter() - start
        block.commit(
            name,
            qweight,
            seconds=timing["hessian_seconds"] + timing["forward_seconds"] + solver_seconds,
            solver_seconds=solver_seconds,
            **timing,
            hessian_sequences=acc.n_sequences,
            hessian_from=owner,  # the linear whose identical input built this Hessian
            **info,
        )
