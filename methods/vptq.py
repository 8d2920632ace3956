"""VPTQ (Liu et al., EMNLP'24): vector quantization with GPTQ's second-order column updates, as
microsoft/VPTQ's algorithm branch `VPTQ.fast_vector_quant` does (reference/methods.md §7.3).

Per linear W [C_out, C_in] with its Hessian H (one pass over the full-precision block: q/k/v and
gate/up share theirs, methods/hessian.py; VPTQ propagates full-precision outputs, §1.1):

0. H as the reference loads it: H / mean(diag H) + 0.01 I (`reference_hessian`; vptq:utils/hessian.py).
1. `enable_norm`: per input column j, s_j = max_i W_ij - min_i W_ij, b_j = min_i W_ij (fp16, as
   stored), W' = (W - b) / s. **Quirk reproduced:** the error feedback then runs on W' with the
   H^-1 of the unnormalized problem (no s_j / s_k correction), as the reference does.
2. k-means sample weights: H_jj of each vector's column (its mean over the vector's elements, the
   zero-padded rows of the last vector counting 0, as the reference's padded weight matrix does).
3. `enable_perm`: columns by diag(H) descending.
4. Partitions of the permuted columns: ceil(outlier_percent% * C_in) outlier columns (padded so the
   rest divides by `group_num`) with their own (outlier_vector_len, outlier_centroids) codebook,
   then `group_num` equal groups with (vector_len, centroids) codebooks each.
5. Codebook init: weighted k-means (methods/kmeans.py) on each partition's vectors, v consecutive
   output rows of one column, the output dim zero-padded to a multiple of v.
6. The VPTQ pass: methods/column_solver.py with `CodebookColumns` (each v-chunk of a column becomes
   its nearest centroid; codebooks frozen), keeping R = (updated w) - q per column.
7. Residual VQ (`residual_centroids` > 0): weighted k-means on R per group partition (the same
   per-vector weights; the reference passes cuML the unaveraged [n, v] weight matrix there, which
   a per-sample weight cannot take literally), then the pass is restarted from the original W'
   with a greedy two-stage search, q = C[i1] + C_res[i2]. The outlier partition has no residual.
8. Stored as a quantlab.kernels.CodebookWeight (perm, fp16 scale / bias in original column order).

Precision (our decision): centroids are rounded to fp16 *before* the passes, since fp16 is what is
stored (the reference runs its pass with fp32 cuML centroids and then stores them at the model
dtype, so its evaluated weights differ from the ones its error feedback saw). Here the pass, the
committed fake-quant weight and the saved model agree bit for bit, and a saved model reloads
identically without any fp32 sidecar.

Bits: every index, codebook (fp16), residual codebook, the perm (32 bits / column) and the norm
scale and bias (16 + 16 bits / column) are counted (kernels/codebook.py). The record also gives
VPTQ's own count (indices + codebooks, §8: `paper_bits`) and the index-only bits. Mind small
models: a 4096 x 6 fp16 codebook is 393 kbit, ~1.2 bits per weight on a 576 x 576 layer.

Not implemented: the paper's layer-wise fine-tuning of centroids and norms (P-vptq App. B; absent
from the released code, vptq:algorithm.md known issue 4).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantlab.kernels import CodebookPartition, CodebookWeight
from quantlab.kernels.codebook import index_bits
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView
from quantlab.methods.column_solver import (
    ColumnPlan,
    ColumnQuantizer,
    Damping,
    HessianNotPositiveDefinite,
    solve_columns,
)
from quantlab.methods.gptq import _sync, tf32_disabled
from quantlab.methods.hessian import collect_hessians, input_representatives
from quantlab.methods.kmeans import INITS, assign, weighted_kmeans

# bits -> (vector_len, centroids, residual_centroids): P-vptq Table 8 / 10 and the README's
# community models (2: v6 k4096, 3: v4 k4096, 4: v6 k4096 + 4096 residual).
BITS_DEFAULTS: dict[int, tuple[int, int, int]] = {2: (6, 4096, 0), 3: (4, 4096, 0), 4: (6, 4096, 4096)}
HESSIAN_DIAG_REG = 0.01  # vptq:utils/hessian.py regularize_H sigma_reg
# Below this many distances, one column's nearest-centroid search runs on one CPU thread: OpenMP's
# fork/join costs more than the GEMM (a 96 x 4096 search took 24 ms on 2 loaded cores, 0.8 ms on one).
SINGLE_THREAD_DISTANCES = 1 << 21


@contextmanager
def _one_cpu_thread(device: torch.device, work: int):
    if device.type != "cpu" or work > SINGLE_THREAD_DISTANCES:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class VPTQConfig(MethodConfig):
    bits: int = 2
    vector_len: int | None = None  # None: from bits (BITS_DEFAULTS)
    centroids: int | None = None
    residual_centroids: int | None = None  # 0: no residual codebook
    outlier_percent: float = 0.0  # --npercent
    outlier_vector_len: int = 4
    outlier_centroids: int = 4096
    group_num: int = 1
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-5
    kmeans_init: str = "random"  # the reference's cuML init; or k-means++
    kmeans_seed: int = 0
    enable_norm: bool = True  # the authors' example commands pass --enable_norm --enable_perm
    enable_perm: bool = True
    damp: float = 0.01
    block_size: int = 128
    supported_bits = (2, 3, 4)

    def codebook(self) -> tuple[int, int, int]:
        """(vector_len, centroids, residual_centroids) after the bits defaults."""
        v, k, r = BITS_DEFAULTS[self.bits]
        return (
            v if self.vector_len is None else self.vector_len,
            k if self.centroids is None else self.centroids,
            r if self.residual_centroids is None else self.residual_centroids,
        )

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        v, k, r = self.codebook()
        problems = []
        if v < 1 or self.outlier_vector_len < 1:
            problems.append("vector_len and outlier_vector_len must be >= 1")
        if k < 2 or self.outlier_centroids < 2:
            problems.append("centroids and outlier_centroids must be >= 2")
        if r != 0 and r < 2:
            problems.append("residual_centroids must be 0 (none) or >= 2")
        if not 0 <= self.outlier_percent < 100:
            problems.append("outlier_percent must be in [0, 100)")
        if self.group_num < 1:
            problems.append("group_num must be >= 1")
        if self.kmeans_iters < 1 or self.kmeans_tol < 0:
            problems.append("kmeans_iters must be >= 1 and kmeans_tol >= 0 (reference: 100, 1e-5)")
        if self.kmeans_init not in INITS:
            problems.append(f"kmeans_init must be one of {', '.join(INITS)}")
        if not self.damp > 0 or self.block_size < 1:
            problems.append("damp must be > 0 and block_size >= 1 (reference: 0.01, 128)")
        if problems:
            raise ConfigError(f"method {method_name!r}: " + "; ".join(problems))


def reference_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """H / mean(diag H) + 0.01 I, the reference's loading rule (it makes no input dead)."""
    H = hessian.detach().float().clone()
    mean_diag = torch.diag(H).mean()
    if mean_diag > 0:
        H /= mean_diag
    H.diagonal().add_(HESSIAN_DIAG_REG)
    return H


def partition_bounds(n_cols: int, outlier_percent: float, group_num: int) -> tuple[list[tuple[int, int]], int]:
    """([start, end) of each partition of the permuted columns, the outlier one first when it is
    not empty], outlier columns): vptq:quantizer.py get_group_setting / get_index_list."""
    outliers = math.ceil(outlier_percent / 100 * n_cols)
    outliers += (n_cols - outliers) % group_num  # the reference pads the outliers, not the groups
    group = (n_cols - outliers) // group_num
    if group < 1:
        raise ConfigError(f"{n_cols} columns leave nothing for {group_num} groups after {outliers} outlier columns")
    bounds = [(0, outliers)] if outliers else []
    bounds += [(outliers + g * group, outliers + (g + 1) * group) for g in range(group_num)]
    return bounds, outliers


def to_vectors(block: torch.Tensor, v: int) -> torch.Tensor:
    """[out, n] -> [ceil(out / v) * n, v]: column-major, each column's rows zero-padded to a
    multiple of v and cut into runs of v (the reference's transpose-then-reshape order)."""
    out, n = block.shape
    n_rows = -(-out // v)
    return F.pad(block.T, (0, n_rows * v - out)).reshape(n * n_rows, v)


def layer_bits(out_features: int, in_features: int, cfg: VPTQConfig) -> dict[str, float]:
    """Bits per weight of one (out, in) linear under `cfg`, from its shape alone (what
    quantlab.kernels.CodebookWeight.storage_bits counts; conf/method/vptq.yaml quotes these):
    `index` (indices only), `paper` (+ codebooks: VPTQ's count, §8), `true` (+ perm, scale, bias)."""
    v, k, k_res = cfg.codebook()
    bounds, n_outliers = partition_bounds(in_features, cfg.outlier_percent, cfg.group_num)
    index = books = 0
    for p, (s, e) in enumerate(bounds):
        pv, pk, pr = (cfg.outlier_vector_len, cfg.outlier_centroids, 0) if n_outliers and p == 0 else (v, k, k_res)
        index += -(-out_features // pv) * (e - s) * (index_bits(pk) + (index_bits(pr) if pr else 0))
        books += 16 * pv * (pk + pr)
    extra = in_features * ((32 if cfg.enable_perm else 0) + (32 if cfg.enable_norm else 0))
    numel = out_features * in_features
    return {"index": index / numel, "paper": (index + books) / numel, "true": (index + books + extra) / numel}


class CodebookColumns(ColumnQuantizer):
    """VPTQ's column quantizer: the permuted column at `position` belongs to one partition; each of
    its v-chunks becomes the nearest centroid of that partition's frozen codebook, plus (with a
    residual codebook) the nearest residual centroid to what is left. Keeps indices by partition
    and R = w - q per position (the reference's `qerror`, the residual k-means' data)."""

    def __init__(
        self, out_features: int, bounds: list[tuple[int, int]], books: list[torch.Tensor],
        residual_books: list[torch.Tensor | None] | None = None,
    ) -> None:
        self.out_features, self.bounds, self.books = out_features, bounds, books
        self.residual_books = residual_books or [None] * len(books)
        device = books[0].device
        self.partition_of = torch.cat([torch.full((e - s,), p) for p, (s, e) in enumerate(bounds)]).tolist()
        rows = [-(-out_features // b.shape[1]) for b in books]
        self.indices = [torch.zeros(r, e - s, dtype=torch.int32, device=device) for r, (s, e) in zip(rows, bounds)]
        self.residual_indices = [
            None if rb is None else torch.zeros_like(idx) for rb, idx in zip(self.residual_books, self.indices)
        ]
        self.residual = torch.zeros(out_features, bounds[-1][1], device=device)

    def fit(self, group: int, columns: torch.Tensor, u_diag: torch.Tensor | None) -> None:
        pass  # the codebooks are fitted by k-means before the pass

    def quantize(self, position: int, group: int, column: torch.Tensor) -> torch.Tensor:
        p = self.partition_of[position]
        book, res_book = self.books[p], self.residual_books[p]
        v = book.shape[1]
        chunks = F.pad(column, (0, self.indices[p].shape[0] * v - self.out_features)).view(-1, v)
        col = position - self.bounds[p][0]
        work = chunks.shape[0] * max(book.shape[0], 0 if res_book is None else res_book.shape[0])
        with _one_cpu_thread(chunks.device, work):
            idx = assign(chunks, book)[0]
            q = book[idx]
            self.indices[p][:, col] = idx.to(torch.int32)
            if res_book is not None:
                res_idx = assign(chunks - q, res_book)[0]
                q = q + res_book[res_idx]
                self.residual_indices[p][:, col] = res_idx.to(torch.int32)
        q = q.reshape(-1)[: self.out_features]
        self.residual[:, position] = column - q
        return q


def proxy_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """mean((D^T D) * H) / mean((W^T W) * H) with D = Q - W (vptq.py get_error), as traces."""
    delta = quantized.float() - weight.float()
    num = torch.einsum("ij,jk,ik->", delta, hessian, delta)
    den = torch.einsum("ij,jk,ik->", weight.float(), hessian, weight.float())
    return float(num / den) if den > 0 else float("nan")


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def vptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, cfg: VPTQConfig,
    codebooks: list[torch.Tensor] | None = None,
) -> tuple[CodebookWeight, dict]:
    """One linear (steps 0-8 of the module docstring); returns the format and its record.
    `codebooks`: fixed main codebooks per partition instead of k-means (tests)."""
    start_time = time.perf_counter()
    v, k, k_res = cfg.codebook()
    W = weight.detach().float()
    out_features, n_cols = W.shape
    H = reference_hessian(hessian)
    col_scale = col_bias = None
    Wn = W
    if cfg.enable_norm:
        lo, hi = W.min(dim=0).values, W.max(dim=0).values
        span = hi - lo  # a constant column would divide by 0 in the reference: scale 1 here
        col_scale = torch.where(span > 0, span, torch.ones_like(span)).to(torch.float16)
        col_bias = lo.to(torch.float16)
        Wn = (W - col_bias.float()) / col_scale.float()
    h_diag = torch.diag(H).clone()  # k-means weights, taken before the dead-column fix (none after step 0)
    perm = torch.argsort(h_diag, descending=True, stable=True) if cfg.enable_perm else None
    Wp = Wn if perm is None else Wn[:, perm]
    hp = h_diag if perm is None else h_diag[perm]
    bounds, n_outliers = partition_bounds(n_cols, cfg.outlier_percent, cfg.group_num)
    specs = [(cfg.outlier_vector_len, cfg.outlier_centroids, 0) if n_outliers and p == 0 else (v, k, k_res)
             for p in range(len(bounds))]

    def partition_vectors(data: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        (s, e), pv = bounds[p], specs[p][0]
        weights = to_vectors(hp[s:e].expand(out_features, -1), pv).mean(dim=1)
        return to_vectors(data[:, s:e], pv), weights

    def kmeans(data: torch.Tensor, p: int, n_centroids: int) -> torch.Tensor:
        points, weights = partition_vectors(data, p)
        result = weighted_kmeans(points, n_centroids, weights, cfg.kmeans_iters, cfg.kmeans_tol,
                                 cfg.kmeans_init, cfg.kmeans_seed)
        kmeans_runs.append({"partition": p, "k": n_centroids, "points": points.shape[0], "iters": result.n_iter,
                            "converged": result.converged, "seconds": result.seconds})
        return _fp16(result.centroids)

    kmeans_runs: list[dict] = []
    books = codebooks if codebooks is not None else [kmeans(Wp, p, specs[p][1]) for p in range(len(bounds))]

    def dequantized(columns: CodebookColumns) -> CodebookWeight:
        parts = [
            CodebookPartition(s, e, columns.books[p].to(torch.float16), columns.indices[p],
                              None if columns.residual_books[p] is None else columns.residual_books[p].to(torch.float16),
                              columns.residual_indices[p])
            for p, (s, e) in enumerate(bounds)
        ]
        return CodebookWeight(out_features, n_cols, parts, perm=perm, col_scale=col_scale, col_bias=col_bias)

    # Nearest centroids without feedback: what k-means alone gives (the reference logs it as the
    # "proxy error before VPTQ").
    plain = CodebookColumns(out_features, bounds, books)
    for position in range(n_cols):
        plain.quantize(position, 0, Wp[:, position])
    info: dict = {"proxy_error_kmeans": proxy_error(W, dequantized(plain).dequantize(), H)}
    plan = ColumnPlan(order=perm, permute_first=True)
    damping = Damping(cfg.damp)
    pass_start = time.perf_counter()
    columns = CodebookColumns(out_features, bounds, books)
    solution = solve_columns(Wn, H, columns, plan, damping, cfg.block_size)
    pass_seconds = time.perf_counter() - pass_start
    if k_res:
        info["proxy_error_first_pass"] = proxy_error(W, dequantized(columns).dequantize(), H)
        residual_books = [None if specs[p][2] == 0 else kmeans(columns.residual, p, specs[p][2])
                          for p in range(len(bounds))]
        pass_start = time.perf_counter()
        columns = CodebookColumns(out_features, bounds, books, residual_books)  # restart from W'
        solution = solve_columns(Wn, H, columns, plan, damping, cfg.block_size)
        pass_seconds += time.perf_counter() - pass_start
    qweight = dequantized(columns)
    numel = out_features * n_cols
    index_total = sum(p.indices.numel() * (index_bits(p.k) + (index_bits(p.k_res) if p.has_residual else 0))
                      for p in qweight.partitions)
    codebook_total = sum(16 * p.vector_len * (p.k + p.k_res) for p in qweight.partitions)
    info.update(
        proxy_error=proxy_error(W, qweight.dequantize(), H),
        vector_len=v, centroids=k, residual_centroids=k_res, outlier_columns=n_outliers,
        partitions=len(bounds), kmeans=kmeans_runs,
        kmeans_seconds=sum(run["seconds"] for run in kmeans_runs), pass_seconds=pass_seconds,
        index_bits=index_total / numel, paper_bits=(index_total + codebook_total) / numel,
        true_bits=qweight.storage_bits() / numel,
        damp=solution.damp, loss=solution.loss, dead_columns=int(solution.dead.sum()),
        quantize_seconds=time.perf_counter() - start_time,
    )
    return qweight, info


@register("vptq")
class VPTQ(Method):
    """Per linear, the record gets: proxy_error (§7.3 step 7, after the last pass;
    proxy_error_kmeans without feedback; proxy_error_first_pass before residual VQ), index_bits
    (indices only), paper_bits (VPTQ's count: indices + codebooks), true_bits (everything stored),
    kmeans (one entry per k-means run), kmeans_seconds and kmeans_share (of the layer's seconds),
    pass_seconds, and its share of the Hessian pass (forward_seconds, hessian_seconds)."""

    config_class = VPTQConfig
    final_inputs_on_passes = True
    propagation = "float"

    @torch.no_grad()
    def quantize_block(self, block: BlockView) -> None:
        cfg: VPTQConfig = self.config  # type: ignore[assignment]
        names = list(block.linears)
        representative = input_representatives(block)
        with tf32_disabled():
            # One pass on the full-precision block: every Hessian is the FP model's, as the
            # reference's precomputed ones are (q/k/v and gate/up share theirs).
            hessians, timing = collect_hessians(block, names)
            share = {key: seconds / len(names) for key, seconds in timing.items()}
            for name in names:
                linear, acc = block.linears[name], hessians[name]
                if acc.n_sequences == 0:
                    raise RuntimeError(f"{block.name}.{name}: no calibration input reached this linear")
                start = time.perf_counter()
                try:
                    qweight, info = vptq_quantize(linear.weight, acc.hessian, cfg)
                except HessianNotPositiveDefinite as exc:
                    raise HessianNotPositiveDefinite(f"{block.name}.{name}: {exc}") from None
                _sync(linear.weight.device)
                seconds = time.perf_counter() - start + share["forward_seconds"] + share["hessian_seconds"]
                info["kmeans_share"] = info["kmeans_seconds"] / seconds if seconds > 0 else 0.0
                block.commit(name, qweight, seconds=seconds, **share, hessian_sequences=acc.n_sequences,
                             hessian_from=representative[name], **info)
