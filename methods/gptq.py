"""GPTQ (Frantar et al., ICLR'23), step for step as IST-DASLab/gptq `fasterquant` (reference/methods.md §3).

The paper's symbols: W [C_out, C_in] is the layer weight (`weight`); H = 2 X X^T the Hessian of the
layer-wise loss ||W X - Q X||^2 over calibration inputs X (`hessian`, see methods/hessian.py);
lambda the relative dampening (`damp`: H + lambda * mean(diag H) * I). The error-feedback loop over
U = chol(H^-1)^T is methods/column_solver.py; GPTQ is its plug-in: a uniform grid per (row, group)
(`GridColumns`) and a plan (act-order's column order, static or dynamic groups).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quantlab.kernels import QuantizedWeight
from quantlab.kernels.groups import group_bounds
from quantlab.methods import quantizer
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView
from quantlab.methods.column_solver import (
    ColumnPlan,
    ColumnQuantizer,
    ColumnSolution,
    Damping,
    HessianNotPositiveDefinite,
    solve_columns,
)
from quantlab.methods.hessian import HessianAccumulator, collect_hessians, input_representatives

FitFn = Callable[[torch.Tensor, quantizer.Grid], tuple[torch.Tensor, torch.Tensor]]


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
    # The reference's floating-point order: one sequence per forward, its Hessian products, the
    # outputs from a full block forward. Same algorithm, slower; to reproduce its numbers to the bit.
    reference_numerics: bool = False
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


class GridColumns(ColumnQuantizer):
    """GPTQ's column quantizer, also OWQ's: a uniform scalar grid per (row, group), fitted by
    `fit_rows` for the whole row (group_size = -1) or `fit_group` per group (GPTQ: both its min-max,
    or its clip search with `mse`; OWQ: its MSE search with 100 and 40 points). Codes are kept by
    position and turned into a `UniformWeight` by `to_format`."""

    def __init__(
        self, grid: quantizer.Grid, shape: tuple[int, int], group_size: int, device: torch.device,
        fit_rows: FitFn, fit_group: FitFn | None = None,
    ) -> None:
        self.grid, self.fit_rows, self.fit_group = grid, fit_rows, fit_group or fit_rows
        self.per_row = group_size == -1
        self.scales = torch.zeros(shape[0], len(group_bounds(shape[1], group_size)), device=device)
        self.zeros = torch.zeros_like(self.scales)
        self.codes = torch.zeros(shape, device=device)  # by position

    def fit(self, group: int, columns: torch.Tensor, u_diag: torch.Tensor | None) -> None:
        fit = self.fit_rows if self.per_row else self.fit_group
        self.scales[:, group], self.zeros[:, group] = fit(columns, self.grid)

    def quantize(self, position: int, group: int, column: torch.Tensor) -> torch.Tensor:
        scale, zero = self.scales[:, group], self.zeros[:, group]
        code = quantizer.quantize(column, scale, zero, self.grid.maxq)
        self.codes[:, position] = code
        return quantizer.dequantize(code, scale, zero)

    def to_format(self, solution: ColumnSolution, plan: ColumnPlan) -> QuantizedWeight:
        """Back to the original column order; g_idx per AutoGPTQ (reference/methods.md §3.4)."""
        n_cols = self.codes.shape[1]
        G = plan.group_size if plan.group_size != -1 else n_cols
        invperm = solution.inverse_order
        if plan.static_groups or plan.order is None:
            g_idx = torch.arange(n_cols, device=invperm.device) // G
        else:
            g_idx = invperm // G  # column j sat at position invperm[j]
        codes, outliers = self.codes, {}
        if plan.n_full_precision:
            n_quant = n_cols - plan.n_full_precision
            kept = solution.order[n_quant:]
            g_idx[kept] = 0  # they carry no codes; the packed reference stores the zero-point there
            codes[:, n_quant:] = self.zeros[:, :1]
            outliers = {"outlier_idx": kept.to(torch.int32), "outlier_values": solution.full_precision.half()}
        return QuantizedWeight(
            codes=codes[:, invperm].to(torch.uint8 if self.grid.bits <= 8 else torch.int16),
            scales=self.scales,
            zeros=self.zeros,
            g_idx=g_idx.to(torch.int32),
            bits=self.grid.bits,
            group_size=plan.group_size,
            zero_format=self.grid.zero_format,
            **outliers,
        )


def solution_info(solution: ColumnSolution) -> dict:
    return {
        "damp": solution.damp,
        "damp_retries": solution.damp_retries,
        "dead_columns": int(solution.dead.sum()),
        "loss": solution.loss,
    }


def act_order_permutation(hessian: torch.Tensor) -> torch.Tensor:
    """Largest diag(H) first, dead inputs counted as H_jj = 1 (the reference sorts after its dead fix)."""
    h_diag = torch.diag(hessian).float().clone()
    h_diag[h_diag == 0] = 1
    return torch.argsort(h_diag, descending=True)


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
) -> tuple[QuantizedWeight, dict]:
    """Quantize `weight` [out, in] against `hessian` [in, in] as `fasterquant` does; returns the
    weight and its record. The loop itself is methods/column_solver.py."""
    if static_groups and group_size == -1:
        raise ValueError("static_groups needs group_size != -1")
    plan = ColumnPlan(
        order=act_order_permutation(hessian) if act_order else None,
        group_size=group_size,
        static_groups=static_groups,
    )
    fit = quantizer.fit_mse if mse else quantizer.fit
    columns = GridColumns(grid, tuple(weight.shape), group_size, weight.device, fit)
    damping = Damping(damp, max_damp_retries, damp_auto_increment)
    solution = solve_columns(weight, hessian, columns, plan, damping, block_size)
    return columns.to_format(solution, plan), solution_info(solution)


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
    forward_seconds (running the block to this group), hessian_seconds, solver_seconds.

    `reference_numerics` follows IST-DASLab's `llama_sequential` wherever the order of floating-point
    operations differs: the fast path sums each Hessian over `calib.batch_size` sequences per
    product and takes the block outputs from the mid-block residual. Both are exact in real
    arithmetic; at 3 bits the last-bit differences change codes (README, "GPTQ: reference numerics")."""

    config_class = GPTQConfig
    final_inputs_on_passes = True  # it never rescales; each linear is committed once

    @property
    def reference_numerics(self) -> bool:
        return getattr(self.config, "reference_numerics", False)  # OWQ's config has no such field

    @property
    def sequences_per_forward(self) -> int | None:  # type: ignore[override]
        return 1 if self.reference_numerics else None

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
        reference = self.reference_numerics
        with tf32_disabled():
            for group in groups:
                # One pass per group, stopped once its inputs are seen; the inputs already carry the
                # quantized weights of the earlier groups (§3.2). Linears sharing an input share a
                # Hessian: the reference builds q/k/v's three times over, to the same bits. The last
                # pass may keep the mid-block residual for the output pass (not in reference mode).
                hessians, timing = collect_hessians(
                    block, group, last_pass=group is groups[-1] and not reference, reference_order=reference
                )
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
