"""Weighted k-means (Lloyd) in torch: VPTQ's codebook fit (reference/methods.md §7.3 step 5).

VPTQ fits each codebook with cuML's KMeans (`init='random'`, `max_iter=100`, `tol=1e-5`,
`random_state=0`, `n_init=1`, fp32) and a sample weight per vector (its column's H_jj). This is
our own implementation of that algorithm, with the same rules read from RAFT's `kmeans::fit`:

- init `random`: k distinct data points drawn uniformly (a seeded permutation), like cuML's /
  sklearn's `init='random'`; `k-means++`: weighted D^2 sampling (the classic, non-greedy
  variant), also seeded. With fewer points than k, every point is taken once and the rest of
  the codebook repeats points drawn at random (those duplicates stay empty clusters);
- each iteration: assign every point to its nearest centroid (squared L2, first index on ties),
  then move each centroid to the weighted mean of its points; a cluster with no weight keeps
  its centroid (RAFT does the same);
- stop after `iters` iterations or as soon as the squared centroid shift summed over all
  centroids falls below `tol` (an absolute threshold, as RAFT's `sqrdNormError < tol`);
- the returned labels and objective are those of a final assignment to the returned centroids.

The objective sum_i w_i ||x_i - c_{a(i)}||^2 never increases across iterations: an exact argmin
cannot raise it, and the weighted mean minimizes it for fixed labels (up to float rounding).

Memory: the [n, k] distance matrix is never built whole. Points are taken in chunks of about
`chunk_elements / k` rows; each chunk's distances come from one GEMM as ||c||^2 - 2 x.c (||x||^2
does not change the argmin), so 4096 centroids over ~150k six-dimensional vectors (a SmolLM2 MLP
layer) use ~16 MiB at a time. Cost per iteration: n * k * v multiply-adds, which is why k-means
dominates VPTQ's quantization time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

INITS = ("random", "k-means++")
# Distances per chunk: 16 MiB of fp32. Measured on 2 loaded CPU cores, assigning 55k vectors to
# 4096 centroids (v = 6): 0.76 s at 2^22 against 0.82 s at 2^24 and 2.2 s at 2^20 (OpenMP's
# fork/join per chunk); with one thread 0.37-0.57 s, smaller chunks being faster (cache).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, v] fp32
    labels: torch.Tensor  # [n] int64: nearest centroid of each point
    objective: float  # sum_i w_i ||x_i - c_labels[i]||^2 at the returned centroids
    n_iter: int  # Lloyd updates performed
    history: list[float] = field(default_factory=list)  # objective at each assignment, in order
    converged: bool = False  # the shift fell below tol before max iterations
    seconds: float = 0.0


def _chunk_rows(k: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, k))


def assign(
    points: torch.Tensor, centroids: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [n], squared distance to the nearest centroid [n]) of each point [n, v], in chunks."""
    c_norm = centroids.pow(2).sum(dim=1)
    labels, dists = [], []
    step = _chunk_rows(centroids.shape[0], chunk_elements)
    for start in range(0, points.shape[0], step):
        x = points[start : start + step]
        scores = torch.addmm(c_norm, x, centroids.T, alpha=-2.0)  # ||c||^2 - 2 x.c
        best, idx = scores.min(dim=1)
        labels.append(idx)
        dists.append((best + x.pow(2).sum(dim=1)).clamp_(min=0))
    if not labels:
        empty = torch.zeros(0, device=points.device)
        return empty.long(), empty
    return torch.cat(labels), torch.cat(dists)


def _init_random(points: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = points.shape[0]
    chosen = torch.randperm(n, generator=gen)[:k]
    if n < k:
        chosen = torch.cat([chosen, torch.randint(n, (k - n,), generator=gen)])
    return points[chosen.to(points.device)].clone()


def _init_kmeans_pp(
    points: torch.Tensor, weights: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """Weighted k-means++: each next centroid is a point drawn with probability w_i * D(x_i)^2."""
    n = points.shape[0]
    if n <= k:
        return _init_random(points, k, gen)
    probs = weights.double().cpu()
    first = int(torch.multinomial(probs / probs.sum(), 1, generator=gen)) if probs.sum() > 0 else 0
    chosen = [first]
    nearest = (points - points[first]).pow(2).sum(dim=1)
    for _ in range(1, k):
        mass = (weights * nearest).double().cpu()
        total = float(mass.sum())
        nxt = int(torch.multinomial(mass / total, 1, generator=gen)) if total > 0 else int(torch.randint(n, (1,), generator=gen))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (points - points[nxt]).pow(2).sum(dim=1))
    return points[torch.tensor(chosen, device=points.device)].clone()


def initial_centroids(
    points: torch.Tensor, k: int, weights: torch.Tensor | None = None, init: str = "random", seed: int = 0
) -> torch.Tensor:
    """The seeded starting codebook [k, v] (see the module docstring); the generator lives on the
    CPU so that a seed gives the same points on every device."""
    if init not in INITS:
        raise ValueError(f"kmeans init={init!r} is not valid; choose one of: {', '.join(INITS)}")
    if points.shape[0] == 0:
        raise ValueError("k-means needs at least one point")
    gen = torch.Generator().manual_seed(seed)
    points = points.float()
    if init == "random":
        return _init_random(points, k, gen)
    w = torch.ones(points.shape[0], device=points.device) if weights is None else weights.float()
    return _init_kmeans_pp(points, w, k, gen)


def weighted_kmeans(
    points: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 100,
    tol: float = 1e-5,
    init: str | torch.Tensor = "random",
    seed: int = 0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> KMeansResult:
    """Cluster `points` [n, v] into `k` centroids minimizing sum_i w_i ||x_i - c_a(i)||^2.
    `weights` [n] >= 0 (None: all ones); `init`: "random", "k-means++" or a [k, v] tensor."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iters < 0 or tol < 0:
        raise ValueError(f"iters and tol must be >= 0, got {iters}, {tol}")
    start_time = time.perf_counter()
    x = points.detach().float()
    n = x.shape[0]
    w = torch.ones(n, device=x.device) if weights is None else weights.detach().float().to(x.device)
    if w.shape != (n,) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be [n] = [{n}], finite and >= 0")
    if isinstance(init, torch.Tensor):
        centroids = init.detach().float().to(x.device).clone()
        if centroids.shape != (k, x.shape[1]):
            raise ValueError(f"init centroids have shape {tuple(centroids.shape)}, expected ({k}, {x.shape[1]})")
    else:
        centroids = initial_centroids(x, k, w, init, seed)
    history: list[float] = []
    converged = False
    n_iter = 0
    for _ in range(iters):
        labels, dist = assign(x, centroids, chunk_elements)
        history.append(float((w * dist).sum()))
        mass = torch.zeros(k, device=x.device).index_add_(0, labels, w)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x * w[:, None])
        filled = mass > 0
        updated = torch.where(filled[:, None], sums / mass.clamp(min=torch.finfo(torch.float32).tiny)[:, None], centroids)
        shift = float((updated - centroids).pow(2).sum())
        centroids = updated
        n_iter += 1
        if shift < tol:
            converged = True
            break
    labels, dist = assign(x, centroids, chunk_elements)
    objective = float((w * dist).sum())
    history.append(objective)
    return KMeansResult(
        centroids=centroids, labels=labels, objective=objective, n_iter=n_iter, history=history,
        converged=converged, seconds=time.perf_counter() - start_time,
    )
