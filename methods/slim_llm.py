"""SliM-LLM (Huang et al., ICML'25): salience-driven group-wise mixed precision on the GPTQ solver,
as Aaronhuang-778/SliM-LLM `slim-llm/` does it (reference/methods.md §6).

The paper's symbols, as named here: W [C_out, C_in] the layer weight; H the Hessian proxy of
methods/hessian.py; U = chol(H^-1)^T (`inverse_hessian_chol`), U_jj its diagonal; G the group size
(`group_size`, groups of consecutive input columns, the last one short where G does not divide
C_in); G_n the number of groups; N the average width (`bits`); k the number of groups moved down
to N-1 bits and, as many, up to N+1 bits, so the per-group widths average exactly N in every
layer; S_g the salience of group g; lambda the salience weight of SQC (`lambda_salience`).

Per block (§6.1): one forward pass collects every linear's H (no true-sequential, no act-order);
the quantized block's outputs feed the next block (`propagation = "quantized"`). Per linear:

1. SBA salience (`group_salience`): S_g = sum over rows i and columns j in g of W_ij^2 / U_jj^2.
2. SBA search (`kl_search`): for k = 1 .. floor(G_n / 2) - 1, round-to-nearest every group at its
   width and measure KL(softmax(X W_k^T) || softmax(Y)) over the output channels, summed over the
   tokens of each calibration sequence; k* minimizes the mean over sequences.
3. Allocation (`allocate`): with the damped U of the GPTQ step, recompute S_g, the k* least
   salient groups get N-1 bits and the k* most salient N+1 (or a given allocation is used).
4. SQC on the column solver (`SalienceColumns`): block size = group size, each group fitted at its
   first column on the error-updated weights with U's diagonal: a +-10% range search weighted by
   salience (>= 2 bits) or the sign binarization (1 bit).

Cost: the search needs every linear's inputs again once the Hessians are known. By default
(`search_inputs="stored"`) the Hessian pass keeps them, and the outputs of the linears it computes
of the searched linears it computes (not those reading the last input it needs, down_proj's:
their Y is recomputed from the kept input), as the reference's hook hands the search the layer's
`out` (memory: tokens x the sum of the block's distinct input widths and of those output widths x
the activation size; computed for SmolLM2 at 128 x 512 in fp32: 0.86 GB of inputs per block, and
1.21 GB of outputs at g64, none at g128, where only down_proj is searched); `"recomputed"` runs the
reference's extra pass instead (same tensors, same bits, inputs and outputs seen on the way). Then each linear scores
floor(G_n / 2) - 1 candidates per sequence: one full product X W_1^T, then one two-group update per
further k (KLSearch; the reference runs a full product per candidate), a softmax and a KL each (plus 3
round-to-nearest passes over W), recorded per layer as search_seconds beside hessian_seconds and
solver_seconds. SQC tries 101
ranges per group; the allocation costs one extra Cholesky per layer.

The committed format is a `UniformWeight` with `group_bits` (kernels/uniform.py); 1-bit groups use
its `binary_one_bit` rule (zero + scale * (2 code - 1)), which holds the reference's
sign(w - z) * delta + z bit for bit. methods/ does no file I/O: a published or saved allocation
reaches the method as a table through `use_allocation` (experiments/run/allocation_files.py reads and
writes the files of `method.allocation` / `method.save_allocation`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantlab.kernels import QuantizedWeight
from quantlab.kernels.groups import contiguous_g_idx, group_bounds
from quantlab.methods import quantizer
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView
from quantlab.methods.column_solver import (
    ColumnPlan,
    ColumnQuantizer,
    Damping,
    inverse_hessian_chol,
    solve_columns,
)
from quantlab.methods.gptq import _sync, solution_info, tf32_disabled
from quantlab.methods.hessian import collect_hessians

SALIENCE_DAMP = 0.01  # slim:slim_gptq.py get_salience: an absolute +0.01 on diag(H), in place (quirk)
SQC_RANGE, SQC_STEPS = 0.1, 50  # slim:utils/mixed_quantizer.py: p in 1 +- 0.1, 50 steps each way
SQC_NORM = 2.4
OUTLIER_Z = 2.0  # slim:utils/salient_mask.py: salient elements from |z-score| > 2
KL_CLAMP = 1e-6  # slim:utils/reconstruct.py kl_div: probabilities clamped before the log
LOG_KL_CLAMP = math.log(KL_CLAMP)


@dataclass
class SliMLLMConfig(MethodConfig):
    bits: int = 2
    group_size: int = 128
    lambda_salience: float = 1.0  # --lambda_salience; 1 in every released run
    range_search: bool = True  # SQC's +-10% range search (false: plain GPTQ min-max, for ablations)
    n_moved: int | None = None  # fixed k per layer (--salient_block = --nonsalient_block); null: KL search
    sym_quirk: bool = True  # reproduce the reference's symmetric N-1 groups before the first N / N+1 group
    damp: float = 0.01  # percdamp, relative, on top of the +0.01 of search mode
    max_damp_retries: int = 0  # the reference has none
    damp_auto_increment: float = 0.0025
    allocation: str | None = None  # a per-group allocation file to load instead of searching (experiments/)
    save_allocation: str | None = None  # where experiments/ writes this run's allocation
    search_inputs: str = "stored"  # stored: the Hessian pass keeps each linear's inputs; recomputed: a second pass
    supported_bits = (2, 3, 4, 5, 6, 7)  # N+1 <= 8: codes stay uint8

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.group_size == -1:
            raise ConfigError(f"method {method_name!r} allocates widths per group: set group_size (128), not -1")
        if not self.damp > 0:
            raise ConfigError(f"method {method_name!r}: damp={self.damp} must be > 0 (0.01 in the reference)")
        if self.n_moved is not None and self.n_moved < 0:
            raise ConfigError(f"method {method_name!r}: n_moved={self.n_moved} must be >= 0 (or null to search)")
        if self.n_moved is not None and self.allocation is not None:
            raise ConfigError(f"method {method_name!r}: set either n_moved or allocation, not both")
        if self.lambda_salience < 0:
            raise ConfigError(f"method {method_name!r}: lambda_salience must be >= 0 (1 in the reference)")
        if self.search_inputs not in ("stored", "recomputed"):
            raise ConfigError(
                f"method {method_name!r}: search_inputs={self.search_inputs!r}: use stored (keep the Hessian pass's "
                "inputs for the KL search) or recomputed (a second pass, for memory)"
            )
        if self.max_damp_retries < 0 or (self.max_damp_retries > 0 and not self.damp_auto_increment > 0):
            raise ConfigError(f"method {method_name!r}: max_damp_retries must be >= 0, damp_auto_increment > 0")


# ---- 1. SBA salience -------------------------------------------------------------------------


def salience_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """The H of search mode: dead inputs set to 1, then +0.01 on the diagonal. The reference does
    this in place on the stored H, so its GPTQ step later sees it too (and, having no zero on the
    diagonal left, zeroes no dead column): we hand this H to the solver to reproduce that."""
    H = hessian.detach().float().clone()
    H.diagonal()[H.diagonal() == 0] = 1
    H.diagonal().add_(SALIENCE_DAMP)
    return H


def chol_inverse_upper(H: torch.Tensor) -> torch.Tensor:
    """U = chol_upper(H^-1) without damping (get_salience's own Cholesky)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def group_salience(weight: torch.Tensor, U: torch.Tensor, group_size: int) -> torch.Tensor:
    """S_g = sum_{i, j in g} W_ij^2 / U_jj^2 per group, [G_n] float64 (the reference's .item() sums;
    it squares fp16 weights in fp16 in search mode; we square in fp32)."""
    W = weight.detach().float()
    u = torch.diag(U)
    return torch.tensor(
        [float((W[:, s:e] ** 2 / u[s:e].reshape(1, -1) ** 2).sum()) for s, e in group_bounds(W.shape[1], group_size)],
        dtype=torch.float64,
    )


def widths_for(salience: torch.Tensor, k: int, bits: int) -> list[int]:
    """The k least salient groups at N-1 bits, the k most salient at N+1, the rest at N. k = 0
    moves nothing (the reference's argsort()[-0:] would move every group up; never reached by its
    search, which starts at k = 1)."""
    widths = [bits] * salience.numel()
    if k:
        order = torch.argsort(salience, stable=True).tolist()
        for g in order[:k]:
            widths[g] = bits - 1
        for g in order[-k:]:  # after the low ones, as the reference labels them
            widths[g] = bits + 1
    return widths


# ---- 2. SBA search: round-to-nearest candidates scored by output KL --------------------------


def binarize_rows(w: torch.Tensor) -> torch.Tensor:
    """1-bit RTN of the search: sign(w - mean_row) * mean_row|w| + mean_row."""
    zero, scale = w.mean(dim=1, keepdim=True), w.abs().mean(dim=1, keepdim=True)
    return torch.sign(w - zero) * scale + zero


def rtn_group(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The search's per-row round-to-nearest of one group: 1 bit binarized, else GPTQ's asymmetric
    min-max with 0 in the range."""
    if bits == 1:
        return binarize_rows(w)
    scale, zero = quantizer.fit(w, quantizer.Grid(bits, sym=False, zero_in_range=True))
    return quantizer.fake_quantize(w, scale[:, None], zero[:, None], 2**bits - 1)


def rtn_by_width(weight: torch.Tensor, group_size: int, widths: set[int]) -> dict[int, torch.Tensor]:
    """W round-to-nearest group by group at each width in `widths`: candidate k takes each group's
    columns from the width it assigns (the reference requantizes every group for every k and sample)."""
    W = weight.detach().float()
    out = {b: torch.empty_like(W) for b in widths}
    for s, e in group_bounds(W.shape[1], group_size):
        for b in widths:
            out[b][:, s:e] = rtn_group(W[:, s:e], b)
    return out


def output_kl(logits: torch.Tensor, log_p_true: torch.Tensor) -> float:
    """KL(softmax(X W_k^T) || softmax(Y)) over output channels, summed over tokens (the reference's
    'batchmean' divides by the leading 1 of Y's [1, T, C_out]); both clamped at 1e-6, unrenormalized.
    The quantized side has no bias while Y has it (quirk kept: bias-free LLaMA is unaffected)."""
    # F.kl_div(log_p_true, p_quant, reduction="sum") term for term: sum p (log p - log p_true), with
    # p = max(softmax, 1e-6), so log p = max(log_softmax, log 1e-6) (one exp and no log per element;
    # p > 0, so xlogy's zero handling, a quarter of the search, is not needed)
    log_p = F.log_softmax(logits, dim=-1).clamp_(min=LOG_KL_CLAMP)
    p_quant = log_p.exp()
    return float(torch.dot(p_quant.view(-1), log_p.sub_(log_p_true).view(-1)))


@contextmanager
def _on_output(block: BlockView, calls: dict[str, Callable[[torch.Tensor, torch.Tensor], None]]):
    """While open, each named linear's forward calls `calls[name](input, output)`."""
    def forward_hook(call: Callable[[torch.Tensor, torch.Tensor], None]):
        def hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            call(args[0], output)  # returns None: the forward's output goes on unchanged
        return hook

    handles = [block.linears[n].register_forward_hook(forward_hook(call)) for n, call in calls.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def scores_candidates(n_groups: int) -> bool:
    """Whether a linear with `n_groups` groups has k candidates to score: k runs over
    1 .. G_n // 2 - 1, so G_n >= 6. With one candidate (G_n = 4 or 5: SmolLM2's 576-wide inputs
    at g128) k = 1 is forced; the reference still scores it, which changes nothing but costs a
    pass: skipped."""
    return n_groups // 2 - 1 >= 2


class KLSearch:
    """The candidates of one linear and their KL per calibration sequence (fed by a hook).

    The products X W_k^T are built incrementally: W_{k+1} differs from W_k in two groups only (the
    (k+1)-th least salient moves from N to N-1 bits, the (k+1)-th most salient from N to N+1), so
    X W_{k+1}^T = X W_k^T + X_g (R_{N-1} - R_N)_g^T + X_h (R_{N+1} - R_N)_h^T, one full product for
    k = 1 and one update of 2 G columns per further k (the two groups' input columns side by side:
    2 G / C_in of a full product, one pass over the output) instead of a full product per
    candidate. Exact in real arithmetic; in float the sums are ordered differently from the
    reference's (which runs in fp16): the KL values agree to float32 rounding (tested against a
    literal transcription of the reference loop, with the same argmin)."""

    def __init__(self, linear: torch.nn.Linear, salience: torch.Tensor, bits: int, group_size: int) -> None:
        self.native_weight = linear.weight.detach()
        self.native_bias = None if linear.bias is None else linear.bias.detach()
        self.weight = self.native_weight.float()
        n_groups = salience.numel()
        self.ks = list(range(1, n_groups // 2))  # the reference's range(1, max_round)
        self.scored = scores_candidates(n_groups)
        self.bits = bits
        self.bounds = group_bounds(self.weight.shape[1], group_size)
        self.order = torch.argsort(salience, stable=True).tolist()  # widths_for's order
        self.rtn = rtn_by_width(self.weight, group_size, {bits - 1, bits, bits + 1}) if self.scored else {}
        # W_1^T and the group updates to k = 2, 3, ..., built once for every sequence add() sees
        self.first = self.candidate(widths_for(salience, 1, bits)).T if self.scored else None
        self.deltas = [self.moves(k) for k in self.ks[1:]] if self.scored else []
        self.errors: list[list[float]] = []  # [sequence][k]

    def candidate(self, widths: list[int]) -> torch.Tensor:
        W = torch.empty_like(self.weight)
        for (s, e), b in zip(self.bounds, widths):
            W[:, s:e] = self.rtn[b][:, s:e]
        return W

    def moves(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two groups that change from candidate k - 1 to k, as one update: (their input
        columns, (R_b - R_N)^T over those columns, stacked)."""
        columns, deltas = [], []
        for g, b in ((self.order[k - 1], self.bits - 1), (self.order[-k], self.bits + 1)):
            s, e = self.bounds[g]
            columns.append(torch.arange(s, e, device=self.weight.device))
            deltas.append((self.rtn[b][:, s:e] - self.rtn[self.bits][:, s:e]).T)
        return torch.cat(columns), torch.cat(deltas).contiguous()

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor | None = None) -> None:
        """Score one chunk of sequences. `outputs`: the linear's own output on `inputs`, when the
        block's pass computed it (it saves recomputing Y, a full product per sequence)."""
        if not self.scored:
            return
        if outputs is None:  # what the layer's forward computes, in its dtype
            outputs = F.linear(inputs.detach(), self.native_weight, self.native_bias)
        xs = inputs.detach().float().reshape(-1, inputs.shape[-2], inputs.shape[-1])
        ys = outputs.detach().float().reshape(xs.shape[0], xs.shape[1], -1)
        # One sequence at a time (the reference averages per-sample errors); Y is the layer's
        # output as the block's forward computes it (the reference's hook `out`), bias included;
        # the quantized side has none (output_kl).
        for x, y_true in zip(xs, ys):
            log_p_true = torch.log(F.softmax(y_true, dim=-1).clamp(min=KL_CLAMP))
            y = x @ self.first
            errors = [output_kl(y, log_p_true)]
            for columns, delta in self.deltas:
                y.addmm_(x.index_select(1, columns), delta)
                errors.append(output_kl(y, log_p_true))
            self.errors.append(errors)

    def curve(self) -> list[float]:
        """Mean KL over sequences for each k (index i is k = i + 1)."""
        if not self.errors:
            return []
        return torch.tensor(self.errors, dtype=torch.float64).mean(dim=0).tolist()

    def best_k(self) -> int:
        """argmin + 1 (first minimum); 1 when it is the only candidate (empty curve: not scored);
        0 when G_n < 4 leaves no candidate (the reference crashes on min([]) there: fixed,
        recorded as k = 0 with an empty curve)."""
        if len(self.ks) == 1:
            return 1
        curve = self.curve()
        return curve.index(min(curve)) + 1 if curve else 0


# ---- 4. SQC: the salience-weighted range search, as a column-solver plug-in -----------------


def salient_mask(sensitivity: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Salient elements of a group: delta >= the smallest delta with |z-score| > 2 (torch.std,
    unbiased, over the whole group). Returns (mask, found); the reference crashes when no element
    is an outlier (min of an empty tensor): fixed here as "no salient element", recorded."""
    z = (sensitivity - sensitivity.mean()) / sensitivity.std()
    outliers = sensitivity[z.abs() > OUTLIER_Z]
    if outliers.numel() == 0:
        return torch.zeros_like(sensitivity, dtype=torch.bool), False
    return sensitivity >= outliers.min(), True


def sqc_candidates() -> torch.Tensor:
    """p = 1, then 1 + 0.002 k and 1 - 0.002 k for k = 1..50, as fp32 linspace points: the order
    matters, a strict < keeps the first minimum (p = 1 wins ties)."""
    up = torch.linspace(1.0, 1 + SQC_RANGE, SQC_STEPS + 1)[1:]
    down = torch.linspace(1.0, 1 - SQC_RANGE, SQC_STEPS + 1)[1:]
    return torch.cat([torch.ones(1), up, down])


def sqc_fit(
    w: torch.Tensor, u_diag: torch.Tensor, bits: int, lambda_salience: float, sym: bool, range_search: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(scale, zero, found_outliers) per row of group `w` [C_out, n] for a width >= 2.

    Start from GPTQ's min-max (range holding 0); with `range_search` try p * (lo, hi) for each p and
    keep per row the lowest sum_nonsalient |w_hat - w|^2.4 + lambda * sum_salient |w_hat - w|^2.4.
    With lambda = 1 (every released run) the weighting cancels: a plain +-10% L2.4 range search.
    `sym` (the quirk): zero = 2^(b-1) with the asymmetric scale, and the zero stays fixed."""
    maxq = 2**bits - 1
    mask_salient, found = salient_mask(w**2 / u_diag.reshape(1, -1) ** 2)
    lo, hi = quantizer.gptq_range(*quantizer.row_range(w), quantizer.Grid(bits, sym=False, zero_in_range=True))
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    if not range_search:
        return scale, zero, found
    nan = torch.tensor(float("nan"), device=w.device)
    best = torch.full([w.shape[0]], float("inf"), device=w.device)
    for p in sqc_candidates().to(w.device):
        lo_p, hi_p = p * lo, p * hi
        scale_p = (hi_p - lo_p) / maxq
        zero_p = zero if sym else torch.round(-lo_p / scale_p)
        err = (quantizer.fake_quantize(w, scale_p[:, None], zero_p[:, None], maxq) - w).abs().pow(SQC_NORM)
        err_nonsalient = torch.nansum(torch.where(mask_salient, nan, err), dim=1)
        err_salient = torch.nansum(torch.where(mask_salient, err, nan), dim=1)
        score = err_nonsalient + lambda_salience * err_salient
        better = score < best
        best = torch.where(better, score, best)
        scale = torch.where(better, scale_p, scale)
        zero = torch.where(better, zero_p, zero)
    return scale, zero, found


class SalienceColumns(ColumnQuantizer):
    """SliM-LLM's column quantizer: group g has width widths[g]; >= 2 bits: an SQC grid per row;
    1 bit: delta = mean|w| and z = mean(w) per row over the group, q = sign(w - z) * delta + z
    (codes 1 for w - z >= 0: the reference's sign(0) = 0 would give z itself, a third level)."""

    def __init__(self, widths: list[int], shape: tuple[int, int], cfg: SliMLLMConfig, sym_groups: set[int]) -> None:
        self.widths, self.cfg, self.sym_groups = widths, cfg, sym_groups
        self.scales = torch.zeros(shape[0], len(widths))
        self.zeros = torch.zeros_like(self.scales)
        self.codes = torch.zeros(shape, dtype=torch.uint8)
        self.groups_without_outliers = 0

    def to(self, device: torch.device) -> SalienceColumns:
        self.scales, self.zeros, self.codes = self.scales.to(device), self.zeros.to(device), self.codes.to(device)
        return self

    def fit(self, group: int, columns: torch.Tensor, u_diag: torch.Tensor | None) -> None:
        bits = self.widths[group]
        if bits == 1:
            self.scales[:, group], self.zeros[:, group] = columns.abs().mean(dim=1), columns.mean(dim=1)
            return
        scale, zero, found = sqc_fit(
            columns, u_diag, bits, self.cfg.lambda_salience, group in self.sym_groups, self.cfg.range_search
        )
        self.scales[:, group], self.zeros[:, group] = scale, zero
        self.groups_without_outliers += not found

    def quantize(self, position: int, group: int, column: torch.Tensor) -> torch.Tensor:
        scale, zero, bits = self.scales[:, group], self.zeros[:, group], self.widths[group]
        if bits == 1:
            code = (column - zero >= 0).float()
            self.codes[:, position] = code.to(torch.uint8)
            return zero + scale * (2 * code - 1)
        code = quantizer.quantize(column, scale, zero, 2**bits - 1)
        self.codes[:, position] = code.to(torch.uint8)
        return quantizer.dequantize(code, scale, zero)

    def to_format(self, bits: int, group_size: int) -> QuantizedWeight:
        widths = torch.tensor(self.widths, dtype=torch.int32)
        return QuantizedWeight(
            codes=self.codes, scales=self.scales, zeros=self.zeros,
            g_idx=contiguous_g_idx(self.codes.shape[1], group_size, device=self.codes.device),
            bits=bits, group_size=group_size, zero_format="int",
            group_bits=widths.to(self.codes.device), binary_one_bit=bool((widths == 1).any()),
        )


def sym_quirk_groups(widths: list[int], bits: int) -> set[int]:
    """The reference's quantizer starts symmetric and turns asymmetric at the first group of N or
    N+1 bits; the N-1 groups before it (at >= 2 bits: 3-bit runs and up) keep a symmetric zero."""
    groups = set()
    for g, b in enumerate(widths):
        if b != bits - 1:
            break
        if b >= 2:
            groups.add(g)
    return groups


# ---- 3. allocation, and one layer end to end -------------------------------------------------


def slim_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, cfg: SliMLLMConfig, k: int | None, widths: list[int] | None = None,
) -> tuple[QuantizedWeight, dict]:
    """One linear: allocate (k groups down and up by the salience under the damped U, or the given
    `widths`), then the column solver with SQC. `hessian` is the H the GPTQ step sees (search mode:
    `salience_hessian(H)`). Returns the weight and its record."""
    G = cfg.group_size
    damping = Damping(cfg.damp, cfg.max_damp_retries, cfg.damp_auto_increment)
    n_groups = len(group_bounds(weight.shape[1], G))
    salience = None
    if widths is None:
        # The solver's own steps, to get its U before the loop: the reference recomputes S_g with
        # the dead-zeroed W and the damped U of its GPTQ step (one extra Cholesky per layer here).
        W, H = weight.detach().float().clone(), hessian.detach().float().clone()
        dead = torch.diag(H) == 0
        H.diagonal()[dead] = 1
        W[:, dead] = 0
        U, _, _ = inverse_hessian_chol(H, damping)
        salience = group_salience(W, U, G)
        if 2 * (k or 0) > n_groups:
            raise ConfigError(f"k={k} groups down and {k} up do not fit in {n_groups} groups (lower method.n_moved)")
        widths = widths_for(salience, k or 0, cfg.bits)
        sym_groups = sym_quirk_groups(widths, cfg.bits) if cfg.sym_quirk else set()
    else:
        if len(widths) != n_groups:
            raise ValueError(f"the allocation has {len(widths)} groups, the layer {n_groups} (group_size={G})")
        sym_groups = set()  # a loaded allocation quantizes every group asymmetrically (§6.3)
    columns = SalienceColumns(widths, tuple(weight.shape), cfg, sym_groups).to(weight.device)
    solution = solve_columns(weight, hessian, columns, ColumnPlan(group_size=G), damping, block_size=G)
    info = solution_info(solution)
    info.update(
        allocation=list(widths),
        allocation_counts={str(b): widths.count(b) for b in sorted(set(widths))},
        mean_group_bits=sum(widths) / len(widths),
        sym_quirk_groups=sorted(sym_groups),
        sqc_groups_without_outliers=columns.groups_without_outliers,
    )
    if salience is not None:
        info["group_salience"] = salience.tolist()
    return columns.to_format(cfg.bits, G), info


@register("slim_llm")
class SliMLLM(Method):
    """Per linear, the record gets: allocation (each group's width), allocation_counts, k and its
    source (search / fixed / file), kl_curve (mean KL for k = 1, 2, ...), hessian_diag_plus (search
    mode: the absolute +0.01 on diag H that the GPTQ step saw too), group_salience,
    sym_quirk_groups, sqc_groups_without_outliers, the solver's damp / loss / dead_columns, and the
    time split: hessian_seconds, search_seconds, solver_seconds."""

    config_class = SliMLLMConfig
    final_inputs_on_passes = True

    def __init__(self, config: SliMLLMConfig) -> None:
        super().__init__(config)
        self.allocation_table: dict[int, dict[str, list[int]]] | None = None

    def use_allocation(self, table: dict[int, dict[str, list[int]]]) -> None:
        """Quantize with these widths instead of searching: {block index: {linear name: [bits per
        group]}}, the layout of the reference's block_precision files."""
        self.allocation_table = {int(i): {str(n): [int(b) for b in bits] for n, bits in layer.items()}
                                 for i, layer in table.items()}

    @torch.no_grad()
    def quantize_block(self, block: BlockView) -> None:
        cfg: SliMLLMConfig = self.config  # type: ignore[assignment]
        names = list(block.linears)
        preset = None
        if self.allocation_table is not None:
            preset = self.allocation_table.get(block.index)
            missing = [n for n in names if preset is None or n not in preset]
            if missing:
                raise ConfigError(f"{block.name}: the allocation has no widths for {', '.join(missing)}")
        searching = preset is None and cfg.n_moved is None
        scored = [n for n in names if searching
                  and scores_candidates(len(group_bounds(block.linears[n].in_features, cfg.group_size)))]
        search_pass = bool(scored)
        with tf32_disabled():
            start = time.perf_counter()
            stored = search_pass and cfg.search_inputs == "stored"
            kept: dict[str, list[torch.Tensor]] | None = {} if stored else None
            # the outputs of the linears whose candidates are scored (no others: they would only
            # hold memory), each with its version counter: a block that later changed one in place
            # (no adapter's does) is caught, and that chunk's Y recomputed, instead of a copy each
            outputs: dict[str, list[tuple[torch.Tensor, int]]] = {n: [] for n in scored} if stored else {}
            keep_output = {n: (lambda _x, y, _kept=outputs[n]: _kept.append((y, y._version))) for n in outputs}
            with _on_output(block, keep_output):
                accumulators, _ = collect_hessians(block, names, last_pass=not search_pass or stored, keep_inputs=kept)
            _sync(block.linears[names[0]].weight.device)
            hessian_seconds = (time.perf_counter() - start) / len(names)
            hessians = {n: accumulators[n].hessian for n in names}
            searches: dict[str, KLSearch] = {}
            search_seconds = 0.0
            if searching:
                start = time.perf_counter()
                for n in names:
                    hessians[n] = salience_hessian(hessians[n])  # per linear: q/k/v share one accumulator
                    salience = group_salience(block.linears[n].weight, chol_inverse_upper(hessians[n]), cfg.group_size)
                    searches[n] = KLSearch(block.linears[n], salience, cfg.bits, cfg.group_size)
                if kept is not None:  # the very tensors the recomputing pass would see, in its order
                    for n, search in searches.items():
                        # the pass stopped at the last input: the linears after it have no output
                        kept_y = outputs.get(n, [])
                        ys = ([y if y._version == version else None for y, version in kept_y]
                              if len(kept_y) == len(kept[n]) else [None] * len(kept[n]))
                        for chunk, y in zip(kept[n], ys):
                            search.add(chunk, y)
                    kept.clear()
                    outputs.clear()
                elif search_pass:
                    with _on_output(block, {n: searches[n].add for n in scored}):
                        block.run(last_pass=True)
                _sync(block.linears[names[0]].weight.device)
                search_seconds = (time.perf_counter() - start) / len(names)
            for n in names:
                start = time.perf_counter()
                if preset is not None:
                    qweight, info = slim_quantize(block.linears[n].weight, hessians[n], cfg, None, preset[n])
                    extra = {"k": None, "allocation_source": "file"}
                elif searching:
                    k = searches[n].best_k()
                    qweight, info = slim_quantize(block.linears[n].weight, hessians[n], cfg, k)
                    extra = {"k": k, "allocation_source": "search", "kl_curve": searches[n].curve(),
                             "kl_candidates": len(searches[n].ks),
                             "hessian_diag_plus": SALIENCE_DAMP}  # the in-place quirk the solver saw
                else:
                    qweight, info = slim_quantize(block.linears[n].weight, hessians[n], cfg, cfg.n_moved)
                    extra = {"k": cfg.n_moved, "allocation_source": "fixed"}
                _sync(block.linears[n].weight.device)
                solver_seconds = time.perf_counter() - start
                block.commit(
                    n, qweight, seconds=hessian_seconds + search_seconds + solver_seconds,
                    hessian_seconds=hessian_seconds, search_seconds=search_seconds, solver_seconds=solver_seconds,
                    block_index=block.index, linear=n, **extra, **info,
                )
