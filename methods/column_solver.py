"""The column solver: GPTQ's error-feedback loop, once, for every column-wise second-order method.

GPTQ, OWQ, SliM-LLM and VPTQ all quantize a weight W [C_out, C_in] one input column at a time and
spread each column's error onto the columns not yet quantized through U = chol(H^-1)^T
(reference/methods.md §3.1, §5.3, §6.3, §7.3 step 6). What differs between them is only:

- the *column quantizer* (`ColumnQuantizer`): how a group's parameters are fitted from weights, and
  how one column becomes codes and its dequantized values (a scalar grid per (row, group) for
  GPTQ / OWQ, a per-group bit width and salience-aware fit for SliM-LLM, nearest centroids of a
  frozen codebook for VPTQ);
- the *column plan* (`ColumnPlan`): the order of the columns, how they are grouped and when groups
  are fitted, and how many trailing columns stay in full precision (OWQ's weak columns).

The paper's symbols, as named here: W the weight (`W`), H = 2 X X^T the Hessian (`H`), lambda the
relative damping (`Damping.damp`), U = chol(H^-1)^T (`inverse_hessian_chol`), B the lazy-batch
width (`block_size`), G the group size (`plan.group_size`), E the scaled errors (w - q) / U_cc of
one lazy batch (`errors`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from quantlab.kernels.groups import group_bounds

log = logging.getLogger(__name__)


class HessianNotPositiveDefinite(RuntimeError):
    """Cholesky of the damped Hessian failed even after the allowed damping retries."""


@dataclass(frozen=True)
class Damping:
    """H + damp * mean(diag H) * I; on a Cholesky failure, damp grows by `increment`, at most
    `max_retries` times (GPTQModel's rule; 0 retries is the reference)."""

    damp: float = 0.01
    max_retries: int = 0
    increment: float = 0.0025


def inverse_hessian_chol(hessian: torch.Tensor, damping: Damping) -> tuple[torch.Tensor, float, int]:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, and the damp and retries it took."""
    mean_diag = torch.mean(torch.diag(hessian))
    damp = damping.damp
    for retry in range(damping.max_retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper, damp, retry
        if retry < damping.max_retries:
            log.warning("column solver: Cholesky failed at damp=%g, retrying with %g", damp, damp + damping.increment)
            damp += damping.increment
    raise HessianNotPositiveDefinite(
        f"Cholesky of the damped Hessian failed at damp={damp:g} after {damping.max_retries} retries; raise "
        "damp (0.1 is common), use more calibration samples, or raise max_damp_retries"
    )


@dataclass(frozen=True)
class ColumnPlan:
    """Which columns are quantized, in what order, and how they are grouped.

    - `order`: position p quantizes original column order[p] (None: the original order).
    - `permute_first`: permute W and H before the per-row fit and the dead-column fix (OWQ's
      reference does; GPTQ's fits first, then permutes for act-order). The result is the same up
      to floating-point summation order in the fits, which the references differ in.
    - `n_full_precision`: the last positions are not quantized; they still receive the error
      updates and come back in `ColumnSolution.full_precision` (OWQ's weak columns).
    - `group_size`: columns per group (-1: one group per row, fitted once before the loop).
    - `static_groups`: groups of consecutive *original* columns, fitted once before the loop
      (GPTQ `static_groups`); otherwise a group is fitted when the loop reaches its first position,
      on the global W, which lacks the current lazy batch's updates (GPTQ's quirk, §3.1, §11.13:
      a group starting mid-batch is fitted on stale weights; with G = B it makes no difference).
    """

    order: torch.Tensor | None = None
    permute_first: bool = False
    n_full_precision: int = 0
    group_size: int = -1
    static_groups: bool = False


class ColumnQuantizer(ABC):
    """One method's way of turning columns into codes; it keeps its own parameters and codes."""

    @abstractmethod
    def fit(self, group: int, columns: torch.Tensor, u_diag: torch.Tensor | None) -> None:
        """Fit group `group`'s parameters on `columns` [C_out, n] (the whole row when group_size is
        -1). `u_diag`: the U_cc of those columns when the fit happens inside the loop, else None."""

    @abstractmethod
    def quantize(self, position: int, group: int, column: torch.Tensor) -> torch.Tensor:
        """Quantize the column at `position` [C_out] with group `group`'s parameters; keep its codes
        and return its dequantized values (a quantizer that needs w - q, VPTQ's residual, keeps it)."""


@dataclass
class ColumnSolution:
    order: torch.Tensor  # [C_in] position -> original column
    full_precision: torch.Tensor | None  # [C_out, n_full_precision] error-updated trailing columns
    loss: float  # sum over columns of (w - q)^2 / U_cc^2 / 2, the reference's Losses
    damp: float
    damp_retries: int
    dead: torch.Tensor  # [C_in] bool, original order: inputs that never fire (their weights zeroed)

    @property
    def inverse_order(self) -> torch.Tensor:
        return torch.argsort(self.order)


def solve_columns(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: ColumnQuantizer,
    plan: ColumnPlan,
    damping: Damping,
    block_size: int = 128,
) -> ColumnSolution:
    """Quantize `weight` [C_out, C_in] column by column against `hessian` [C_in, C_in]."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    n_cols = W.shape[1]
    n_quant = n_cols - plan.n_full_precision
    if not 0 <= plan.n_full_precision < n_cols:
        raise ValueError(f"n_full_precision={plan.n_full_precision} must leave at least one of {n_cols} columns")
    if plan.static_groups and plan.group_size == -1:
        raise ValueError("static_groups needs group_size != -1")
    G = plan.group_size if plan.group_size != -1 else n_cols
    identity = torch.arange(n_cols, device=W.device)
    perm = identity if plan.order is None else plan.order.to(W.device)
    permuted = False
    if plan.permute_first and plan.order is not None:
        W, H, permuted = W[:, perm], H[perm][:, perm], True
    # 1. Per-row parameters (group_size = -1), fitted before the dead columns are zeroed.
    if plan.group_size == -1:
        quantizer.fit(0, W[:, :n_quant], None)
    # 2. Inputs that never fire: their weights cannot matter; H_jj = 1 keeps H invertible.
    dead = torch.diag(H) == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    # 3. Static groups: fitted on the original column order, before any permutation.
    if plan.static_groups:
        for g, (start, end) in enumerate(group_bounds(n_quant, plan.group_size)):
            quantizer.fit(g, W[:, start:end], None)
    if not permuted and plan.order is not None:
        W, H = W[:, perm], H[perm][:, perm]
    # 4. Damping and U.
    U, damp_used, retries = inverse_hessian_chol(H, damping)
    del H
    # 5. Lazy batches: exact OBS updates inside [i1, i2), one matmul for everything to the right.
    losses = torch.zeros_like(W)
    original_column = perm.tolist()
    for i1 in range(0, n_quant, block_size):
        i2 = min(i1 + block_size, n_quant)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if plan.static_groups:
                g = original_column[c] // G
            else:
                g = c // G
                if plan.group_size != -1 and c % G == 0:
                    end = min(c + G, n_quant)
                    quantizer.fit(g, W[:, c:end], torch.diag(U)[c:end])
            w, d = W1[:, i], U1[i, i]
            q = quantizer.quantize(c, g, w)
            losses[:, c] = (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= torch.outer(err, U1[i, i:])
            errors[:, i] = err
        W[:, i2:] -= errors @ U[i1:i2, i2:]  # reaches the full-precision columns too
    if permuted:  # dead was found at permuted positions
        dead_original = torch.zeros_like(dead)
        dead_original[perm] = dead
    else:
        dead_original = dead
    return ColumnSolution(
        order=perm,
        full_precision=W[:, n_quant:].clone() if plan.n_full_precision else None,
        loss=float(losses.sum()),
        damp=damp_used,
        damp_retries=retries,
        dead=dead_original,
    )
