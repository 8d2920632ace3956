"""The column solver on its own: any column quantizer plugs in without touching the loop."""

import torch

from quantlab.methods.column_solver import (
    ColumnPlan,
    ColumnQuantizer,
    Damping,
    inverse_hessian_chol,
    solve_columns,
)


def problem(out_features=12, in_features=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, in_features, generator=g) @ torch.randn(in_features, in_features, generator=g)
    return torch.randn(out_features, in_features, generator=g), 2 * x.T @ x


class Centroids(ColumnQuantizer):
    """VPTQ's step: each run of v rows of a column becomes its nearest centroid (frozen codebook)."""

    def __init__(self, centroids, shape):
        self.centroids, self.v = centroids, centroids.shape[1]
        self.indices = torch.zeros(shape[0] // self.v, shape[1], dtype=torch.long)

    def fit(self, group, columns, u_diag):
        pass  # the codebook is fitted before the loop

    def quantize(self, position, group, column):
        chunks = column.view(-1, self.v)
        nearest = torch.cdist(chunks, self.centroids).argmin(dim=1)
        self.indices[:, position] = nearest
        return self.centroids[nearest].reshape(-1)


def literal_vptq_pass(W, H, centroids, block_size=128, damp=0.01):
    """methods.md §7.3 step 6, transcribed: per column, nearest centroid per v-chunk, OBS feedback."""
    W, H = W.clone(), H.clone()
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    n = W.shape[1]
    v = centroids.shape[1]
    for i in range(0, n, block_size):
        j = min(i + block_size, n)
        E = torch.zeros(W.shape[0], j - i)
        for c in range(i, j):
            chunks = W[:, c].reshape(-1, v)
            qc = centroids[torch.cdist(chunks, centroids).argmin(dim=1)].reshape(-1)
            e = (W[:, c] - qc) / U[c, c]
            W[:, c + 1 : j] -= torch.outer(e, U[c, c + 1 : j])
            E[:, c - i] = e
            Q[:, c] = qc
        W[:, j:] -= E @ U[i:j, j:]
    return Q


def test_a_vector_quantizer_plugs_in_and_matches_the_literal_vptq_pass():
    weight, hessian = problem()
    centroids = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    quantizer = Centroids(centroids, weight.shape)
    solution = solve_columns(weight, hessian, quantizer, ColumnPlan(), Damping(0.01), block_size=16)
    ours = centroids[quantizer.indices].permute(0, 2, 1).reshape(weight.shape)  # [out/v, v, in]
    expected = literal_vptq_pass(weight, hessian, centroids, block_size=16)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert solution.loss > 0 and solution.damp == 0.01 and not solution.dead.any()


class Identity(ColumnQuantizer):
    def fit(self, group, columns, u_diag):
        self.fitted = getattr(self, "fitted", []) + [(group, columns.shape[1], u_diag is not None)]

    def quantize(self, position, group, column):
        return column.clone()


def test_lossless_columns_leave_the_weight_and_fit_groups_where_the_plan_says():
    weight, hessian = problem()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    quantizer = Identity()
    plan = ColumnPlan(order=order, permute_first=True, n_full_precision=4, group_size=16)
    solution = solve_columns(weight, hessian, quantizer, plan, Damping(0.01), block_size=8)
    assert solution.loss == 0
    # No error, no update: the trailing full-precision columns come back as they were.
    assert torch.equal(solution.full_precision, weight[:, order[36:]])
    # Dynamic groups over the 36 quantized positions: fitted at 0, 16, 32, inside the loop.
    assert quantizer.fitted == [(0, 16, True), (1, 16, True), (2, 4, True)]


def test_dead_inputs_are_zeroed_and_reported_in_the_original_order():
    weight, hessian = problem()
    hessian[5, :] = hessian[:, 5] = 0
    order = torch.arange(40).flip(0)
    for permute_first in (False, True):
        solution = solve_columns(
            weight, hessian, Identity(), ColumnPlan(order=order, permute_first=permute_first), Damping(0.01)
        )
        assert solution.dead.nonzero().flatten().tolist() == [5]


def test_damping_retries_then_records_the_damp():
    _, hessian = problem()
    upper, damp, retries = inverse_hessian_chol(hessian, Damping(0.01, 3, 0.01))
    assert retries == 0 and damp == 0.01
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(hessian + 0.01 * hessian.diag().mean() * torch.eye(40)),
                          rtol=1e-3, atol=1e-6)
