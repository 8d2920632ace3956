"""OWQ (Lee et al., AAAI'24): GPTQ that keeps a few sensitive ("weak") input columns in fp16,
as xvyaward/owq `main.py` and `owq/recon.py` do (reference/methods.md §5).

Per layer: (1) how many weak columns, from the target bit-width and a per-family table of
per-role ratios (§5.1), or a fixed count; (2) which ones: sensitivity s_j = H_jj * e_j, with e_j
the squared error of column j under a per-row b-bit quantizer fitted on the whole weight (§5.2);
(3) the GPTQ solver over the other columns in a custom order (weak columns last, in descending
sensitivity), whose lazy updates still reach the weak columns; they are then stored in fp16 with
those updated values (§5.3). The dense part uses OWQ's MSE grid search (`tuning: mse`).

Bits: each weak column costs 16 bits per value plus a 32-bit index (kernels/uniform.py);
with the default target the extra bits per weight over a block come out at ~target - bits.

Cost: the MSE search evaluates num * 2^b candidate grids per row (800 at 3 bits for the main fit,
320 more for the sensitivity fit), each a pass of |w - w_hat|^2.4 over the row: negligible on a GPU,
but ~10 s per 1536 x 576 matrix on one CPU core (a CPU SmolLM2-135M run takes tens of minutes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from quantlab.kernels import QuantizedWeight
from quantlab.methods import quantizer
from quantlab.methods.base import ConfigError, MethodConfig, register
from quantlab.methods.block import BlockView
from quantlab.methods.column_solver import ColumnPlan, Damping, solve_columns
from quantlab.methods.gptq import GPTQ, GridColumns, solution_info

# owq:model_config.json "ratios": each layer type gets about d^2 of fp16 "column budget" per block.
# Keyed by role: a linear's last name component without "_proj" (q_proj -> q, out_proj -> out).
WEAK_COLUMN_RATIOS: dict[str, dict[str, float]] = {
    "llama": {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1.0, "gate": 0.375, "up": 0.375, "down": 0.375},
    "opt": {"q": 1.0, "k": 1.0, "v": 1.0, "out": 1.0, "fc1": 0.25, "fc2": 0.25},
}
DEFAULT_TARGET_OFFSET = 0.01  # bits=3 means OWQ's README target 3.01
MAIN_GRID_POINTS = 100  # owq:quant.py find_params default `num`
GROUP_GRID_POINTS = 40  # per-group refits and the sensitivity quantizer (owq:recon.py, main.py)


def role(name: str) -> str:
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def weak_column_count(family: str, name: str, in_features: int, bits: int, target_bits: float) -> int:
    """n = round(C_in * r * ratio), made even (the reference kernel needs an even count), with
    r = 12 / (16 - b) * (t - b) / L and L the number of layer types (owq:main.py)."""
    try:
        ratios = WEAK_COLUMN_RATIOS[family]
    except KeyError:
        raise ConfigError(
            f"OWQ has no weak-column ratios for family {family!r} (known: {', '.join(WEAK_COLUMN_RATIOS)}); "
            "add them to methods/owq.py WEAK_COLUMN_RATIOS or set method.n_outliers"
        ) from None
    if role(name) not in ratios:
        raise ConfigError(f"OWQ: linear {name!r} has no ratio in the {family!r} table; set method.n_outliers")
    r = 12 / (16 - bits) * (target_bits - bits) / len(ratios)
    n = round(in_features * r * ratios[role(name)])  # Python's round, ties to even, as the reference
    return n + 1 if n % 2 else n


def sensitivity(
    weight: torch.Tensor, hessian: torch.Tensor, fit_fn: Callable, bits: int, frob_norm: bool
) -> torch.Tensor:
    """s_j = H_jj * sum_i (W_ij - Q(W)_ij)^2 with Q a per-row quantizer fitted on the whole W
    (just H_jj without `frob_norm`). The raw H: dead inputs (H_jj = 0) get s_j = 0."""
    h_diag = torch.diag(hessian).float()
    if not frob_norm:
        return h_diag
    w = weight.detach().float()
    scale, zero = fit_fn(w)
    error = (w - quantizer.fake_quantize(w, scale[:, None], zero[:, None], 2**bits - 1)).pow(2).sum(dim=0)
    return h_diag * error


def column_order(scores: torch.Tensor, h_diag: torch.Tensor, n_weak: int, act_order: bool) -> torch.Tensor:
    """owq:recon.py hessian_sorting: the non-weak columns in original order (act-order: descending
    sensitivity), then the n_weak most sensitive in descending order. With no weak column,
    act-order sorts by the raw H diagonal (dead inputs last), as GPTQ does after its dead fix."""
    n = scores.numel()
    if n_weak == 0:
        return torch.argsort(h_diag, descending=True) if act_order else torch.arange(n, device=scores.device)
    descending = torch.argsort(scores, descending=True)
    if act_order:
        return torch.cat([descending[n_weak:], descending[:n_weak]])
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    keep[descending[:n_weak]] = False
    return torch.cat([torch.arange(n, device=scores.device)[keep], descending[:n_weak]])


@dataclass
class OWQConfig(MethodConfig):
    bits: int = 3
    group_size: int = -1
    target_bits: float | None = None  # None: bits + 0.01 (OWQ's 3.01 / 4.01)
    n_outliers: int | None = None  # a fixed count per linear (--target_rank); excludes target_bits
    tuning: str = "mse"  # mse: OWQ's grid search (its default with a target); minmax: GPTQ's grid
    frob_norm: bool = True  # sensitivity H_jj * e_j (false: H_jj only; --no_frob_norm)
    sym: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool | None = False  # OWQ's default is off; None: the family's GPTQ default
    max_damp_retries: int = 5
    damp_auto_increment: float = 0.0025
    supported_bits = (2, 3, 4)  # owq:main.py --wbits choices (16 is the fp16 baseline here)

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.tuning not in ("mse", "minmax"):
            raise ConfigError(
                f"method {method_name!r}: tuning={self.tuning!r} is not valid; use mse or minmax"
            )
        if self.target_bits is not None and self.n_outliers is not None:
            raise ConfigError(
                f"method {method_name!r}: set either target_bits or n_outliers (a fixed count), not both"
            )
        if self.target_bits is not None and math.floor(self.target_bits) != self.bits:
            raise ConfigError(
                f"method {method_name!r}: target_bits={self.target_bits} must satisfy floor(target_bits) = "
                f"bits = {self.bits} (e.g. {self.bits + DEFAULT_TARGET_OFFSET:.2f})"
            )
        if self.n_outliers is not None and self.n_outliers < 0:
            raise ConfigError(f"method {method_name!r}: n_outliers={self.n_outliers} must be >= 0")
        if self.block_size < 1:
            raise ConfigError(f"method {method_name!r}: block_size={self.block_size} must be >= 1 (128)")
        if not self.damp > 0:
            raise ConfigError(f"method {method_name!r}: damp={self.damp} must be > 0 (0.01 in the reference)")
        if self.max_damp_retries < 0 or (self.max_damp_retries > 0 and not self.damp_auto_increment > 0):
            raise ConfigError(
                f"method {method_name!r}: max_damp_retries must be >= 0, damp_auto_increment > 0"
            )

    @property
    def effective_target_bits(self) -> float:
        return self.bits + DEFAULT_TARGET_OFFSET if self.target_bits is None else self.target_bits

    def grid(self) -> quantizer.Grid:
        return quantizer.Grid(self.bits, sym=self.sym, zero_in_range=True)

    def fit_fn(self, num: int):
        """OWQ's per-row fit as a function of W alone (`num` grid points when tuning = mse)."""
        return partial(quantizer.fit_owq, bits=self.bits, sym=self.sym, mse=self.tuning == "mse", num=num)


def owq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, n_weak: int, cfg: OWQConfig
) -> tuple[QuantizedWeight, dict]:
    """One layer: choose the weak columns, run the GPTQ solver on the others; returns the
    QuantizedWeight (weak columns as fp16 outliers) and its record."""
    n_cols = weight.shape[1]
    if not 0 <= n_weak < n_cols:
        raise ValueError(f"OWQ: {n_weak} weak columns leave nothing to quantize in {n_cols} columns")
    scores = sensitivity(weight, hessian, cfg.fit_fn(GROUP_GRID_POINTS), cfg.bits, cfg.frob_norm)
    h_diag = torch.diag(hessian).float()
    order = column_order(scores, h_diag, n_weak, cfg.act_order)
    explicit = n_weak > 0 or cfg.act_order  # no weak column, no act-order: the plain GPTQ path
    # The reference permutes W and H before fitting (GPTQ fits first): the weak columns go last.
    plan = ColumnPlan(
        order=order if explicit else None, permute_first=True, n_full_precision=n_weak, group_size=cfg.group_size
    )
    main_fit, group_fit = cfg.fit_fn(MAIN_GRID_POINTS), cfg.fit_fn(GROUP_GRID_POINTS)
    columns = GridColumns(
        cfg.grid(), tuple(weight.shape), cfg.group_size, weight.device,
        fit_rows=lambda w, grid: main_fit(w), fit_group=lambda w, grid: group_fit(w),
    )
    damping = Damping(cfg.damp, cfg.max_damp_retries, cfg.damp_auto_increment)
    solution = solve_columns(weight, hessian, columns, plan, damping, cfg.block_size)
    qweight, info = columns.to_format(solution, plan), solution_info(solution)
    weak = order[n_cols - n_weak :]
    total = float(scores.sum())
    info.update(
        n_outliers=n_weak,
        outlier_idx=[int(j) for j in weak],
        sensitivity_weak_share=float(scores[weak].sum()) / total if total > 0 else 0.0,
        sensitivity_max=float(scores.max()),
        sensitivity_median=float(scores.median()),
        sensitivity_threshold=float(scores[weak[-1]]) if n_weak else None,  # the least sensitive weak one
    )
    return qweight, info


@register("owq")
class OWQ(GPTQ):
    """GPTQ's sequencing (one Hessian pass per sequential group, shared Hessians, timing shares;
    true-sequential off by default as in owq:main.py) with OWQ's per-layer solve. The record adds
    n_outliers, outlier_idx (descending sensitivity), target_bits, and sensitivity statistics:
    the weak columns' share of the total, the max, the median and the smallest weak score."""

    config_class = OWQConfig

    def n_weak(self, block: BlockView, name: str) -> int:
        cfg: OWQConfig = self.config  # type: ignore[assignment]
        if cfg.n_outliers is not None:
            return cfg.n_outliers
        in_features = block.linears[name].in_features
        return weak_column_count(block.family, name, in_features, cfg.bits, cfg.effective_target_bits)

    def solve(self, block: BlockView, name: str, hessian: torch.Tensor) -> tuple[QuantizedWeight, dict]:
        cfg: OWQConfig = self.config  # type: ignore[assignment]
        linear = block.linears[name]
        n_weak = self.n_weak(block, name)
        if n_weak >= linear.in_features:
            raise ConfigError(
                f"{block.name}.{name}: {n_weak} weak columns for {linear.in_features} inputs; lower "
                "method.n_outliers or method.target_bits"
            )
        qweight, info = owq_quantize(linear.weight, hessian, n_weak, cfg)
        info["target_bits"] = None if cfg.n_outliers is not None else cfg.effective_target_bits
        return qweight, info
