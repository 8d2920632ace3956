"""Weighted k-means (methods/kmeans.py): seeded, monotone, and the reference's Lloyd step."""

import pytest
import torch

from quantlab.methods.kmeans import assign, initial_centroids, weighted_kmeans

pytestmark = pytest.mark.usefixtures("single_thread")


def blobs(n=600, v=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, v, generator=gen) * 3
    points = centers[torch.randint(12, (n,), generator=gen)] + torch.randn(n, v, generator=gen)
    weights = torch.rand(n, generator=gen) + 0.05
    return points, weights


def literal_lloyd(X, w, C, max_iter, tol):
    """The reference's fit (cuML / RAFT kmeans::fit, as methods.md §7.3 step 5 uses it), written
    out point by point: nearest centroid by torch.cdist, weighted mean per cluster (an empty
    cluster keeps its centroid), stop when the summed squared shift is below tol."""
    C = C.clone().double()
    X, w = X.double(), w.double()
    n_iter = 0
    for _ in range(max_iter):
        labels = torch.cdist(X, C).argmin(dim=1)
        new = C.clone()
        for j in range(C.shape[0]):
            members = labels == j
            if w[members].sum() > 0:
                new[j] = (w[members, None] * X[members]).sum(0) / w[members].sum()
        shift = ((new - C) ** 2).sum()
        C = new
        n_iter += 1
        if shift < tol:
            break
    return C.float(), torch.cdist(X, C.double()).argmin(dim=1), n_iter


def test_matches_a_literal_transcription_of_the_reference_lloyd_step():
    points, weights = blobs()
    init = initial_centroids(points, 16, weights, "random", seed=3)
    expected, labels, n_iter = literal_lloyd(points, weights, init, 50, 1e-5)
    got = weighted_kmeans(points, 16, weights, iters=50, tol=1e-5, init=init)
    assert got.n_iter == n_iter
    assert torch.equal(got.labels, labels)
    assert torch.allclose(got.centroids, expected, atol=1e-5)


def test_random_init_takes_distinct_points_and_is_deterministic_for_a_seed():
    points, weights = blobs()
    first = initial_centroids(points, 32, weights, "random", seed=0)
    assert torch.equal(first, initial_centroids(points, 32, weights, "random", seed=0))
    assert not torch.equal(first, initial_centroids(points, 32, weights, "random", seed=1))
    rows = {tuple(r.tolist()) for r in first}
    assert len(rows) == 32 and rows <= {tuple(r.tolist()) for r in points}
    for init in ("random", "k-means++"):
        a = weighted_kmeans(points, 24, weights, iters=30, init=init, seed=7)
        b = weighted_kmeans(points, 24, weights, iters=30, init=init, seed=7)
        assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_the_weighted_objective_never_increases(init):
    points, weights = blobs(n=900, v=6, seed=1)
    result = weighted_kmeans(points, 40, weights, iters=40, tol=0.0, init=init, seed=0, chunk_elements=997)
    history = torch.tensor(result.history, dtype=torch.float64)
    assert len(history) == result.n_iter + 1
    assert bool((history[1:] <= history[:-1] * (1 + 1e-6)).all()), history
    assert history[-1] < history[0]
    # the reported objective is that of the returned centroids and labels
    labels, dist = assign(points, result.centroids)
    assert torch.equal(labels, result.labels)
    assert result.objective == pytest.approx(float((weights * dist).sum()), rel=1e-5)


def test_weights_pull_centroids_and_a_tolerance_stops_early():
    x = torch.tensor([[0.0], [1.0], [10.0]])
    heavy = weighted_kmeans(x, 2, torch.tensor([1.0, 3.0, 1.0]), iters=10, init=torch.tensor([[0.0], [10.0]]))
    assert torch.allclose(heavy.centroids, torch.tensor([[0.75], [10.0]]))
    assert heavy.converged and heavy.n_iter == 2  # second update moves nothing
    points, weights = blobs()
    loose = weighted_kmeans(points, 16, weights, iters=100, tol=1e9)
    assert loose.n_iter == 1 and loose.converged


def test_chunked_assignment_equals_one_shot_and_fewer_points_than_centroids():
    points, _ = blobs(n=300)
    centroids = torch.randn(50, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(assign(points, centroids, chunk_elements=50 * 7)[0], torch.cdist(points, centroids).argmin(1))
    few = points[:5]
    result = weighted_kmeans(few, 8, iters=5)
    assert result.centroids.shape == (8, 4) and result.objective == pytest.approx(0.0, abs=1e-5)
