"""VPTQ (methods/vptq.py): lossless with every vector in the codebook, GPTQ on a shared grid at
v = 1, the reference's normalisation quirk, partitions, residual VQ, bits and the block hook."""

import pytest
import torch

from quantlab.kernels import CodebookWeight, format_from_packed
from quantlab.methods import REGISTRY, ConfigError
from quantlab.methods.column_solver import ColumnPlan, Damping, solve_columns
from quantlab.methods.gptq import GridColumns, act_order_permutation
from quantlab.methods.hessian import HessianAccumulator
from quantlab.methods.quantizer import Grid
from quantlab.methods.vptq import (
    VPTQ,
    CodebookColumns,
    VPTQConfig,
    layer_bits,
    partition_bounds,
    proxy_error,
    reference_hessian,
    vptq_quantize,
)
from tests.methods.test_column_solver import literal_vptq_pass

pytestmark = pytest.mark.usefixtures("single_thread")


def problem(out_features=24, in_features=40, seed=0, correlated=None):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.1
    x = correlated(512, in_features, seed)
    acc = HessianAccumulator(in_features)
    acc.add(x.reshape(4, -1, in_features))
    return weight, acc.hessian


def small(**kw):
    base = dict(bits=2, vector_len=4, centroids=16, kmeans_iters=10)
    return VPTQConfig(**{**base, **kw})


def test_registered_with_the_documented_bits_defaults():
    assert REGISTRY["vptq"] is VPTQ and VPTQ.propagation == "float"
    assert VPTQConfig(bits=2).codebook() == (6, 4096, 0)
    assert VPTQConfig(bits=3).codebook() == (4, 4096, 0)
    assert VPTQConfig(bits=4).codebook() == (6, 4096, 4096)
    assert VPTQConfig(bits=4, residual_centroids=0, vector_len=8).codebook() == (8, 4096, 0)
    cfg = VPTQConfig()
    assert (cfg.kmeans_iters, cfg.kmeans_tol, cfg.kmeans_init, cfg.damp, cfg.block_size) == (100, 1e-5, "random", 0.01, 128)
    for bad in (dict(bits=5), dict(residual_centroids=1), dict(outlier_percent=100), dict(kmeans_init="kmeans"),
                dict(group_num=0), dict(centroids=1)):
        with pytest.raises(ConfigError):
            VPTQConfig(**bad).validate("vptq")


def test_lossless_when_the_codebook_holds_every_distinct_vector(correlated):
    _, hessian = problem(correlated=correlated)
    gen = torch.Generator().manual_seed(3)
    atoms = torch.randn(8, 4, generator=gen).half().float()  # fp16-exact: the stored codebook
    weight = atoms[torch.randint(8, (6, 40), generator=gen)].permute(0, 2, 1).reshape(24, 40)
    # k-means++ never picks a point already covered, so with k = 8 it finds all 8 atoms
    qweight, info = vptq_quantize(weight, hessian, small(centroids=8, kmeans_init="k-means++", enable_norm=False))
    assert torch.equal(qweight.dequantize(), weight)
    assert info["proxy_error"] == 0 and info["loss"] == 0
    # random init over k >= n points also holds every vector; with normalisation the only loss
    # is the fp16 rounding of the normalised centroids
    qweight, info = vptq_quantize(weight, hessian, small(centroids=256, enable_norm=True))
    assert torch.allclose(qweight.dequantize(), weight, atol=2e-3) and info["proxy_error"] < 1e-5


@pytest.mark.parametrize("enable_perm", [False, True])
def test_vector_length_one_on_a_uniform_grid_is_gptq_on_that_grid(correlated, enable_perm):
    """v = 1 with the codebook {s (j - z)}: nearest centroid = clamp(round(w / s) + z) on the grid.
    GPTQ's plug-in gets the same grid for every row (a fixed per-row fit) and the Hessian VPTQ
    loads (H / mean diag + 0.01 I); act-order is VPTQ's enable_perm."""
    weight, hessian = problem(correlated=correlated)
    grid = Grid(3, sym=False)
    scale, zero = 2.0**-4, 4.0
    book = (scale * (torch.arange(8.0) - zero))[:, None]
    cfg = small(vector_len=1, centroids=8, enable_norm=False, enable_perm=enable_perm, block_size=16)
    qweight, info = vptq_quantize(weight, hessian, cfg, codebooks=[book])

    def shared_grid(w, _grid):
        return torch.full((w.shape[0],), scale), torch.full((w.shape[0],), zero)

    H = reference_hessian(hessian)
    plan = ColumnPlan(order=act_order_permutation(H) if enable_perm else None)
    columns = GridColumns(grid, tuple(weight.shape), -1, weight.device, shared_grid)
    solution = solve_columns(weight, H, columns, plan, Damping(0.01), block_size=16)
    gptq = scale * (columns.codes[:, solution.inverse_order] - zero)
    assert torch.equal(qweight.dequantize(), gptq)
    assert info["loss"] == pytest.approx(solution.loss, rel=1e-6)


def test_the_pass_is_the_literal_reference_pass_in_the_normalised_space(correlated):
    """enable_norm: the feedback runs on W' = (W - b) / s with the unnormalised H^-1 (the
    reference's quirk), then W = W' s + b."""
    weight, hessian = problem(correlated=correlated)
    book = (torch.randn(16, 4, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.5).half().float()
    cfg = small(enable_norm=True, enable_perm=False, block_size=16)
    qweight, _ = vptq_quantize(weight, hessian, cfg, codebooks=[book])
    s, b = qweight.col_scale.float(), qweight.col_bias.float()
    assert torch.equal(b, weight.min(0).values.half().float())
    normalised = (weight - b) / s
    expected = literal_vptq_pass(normalised, reference_hessian(hessian), book, block_size=16)
    assert torch.allclose(qweight.dequantize(), expected * s + b, atol=1e-6)


def test_partitions_follow_the_reference_padding():
    assert partition_bounds(576, 0, 1) == ([(0, 576)], 0)
    assert partition_bounds(576, 1, 4) == ([(0, 8), (8, 150), (150, 292), (292, 434), (434, 576)], 8)
    assert partition_bounds(10, 0, 4) == ([(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)], 2)  # padding outliers


def test_outliers_groups_and_residual_give_a_consistent_codebook_weight(correlated):
    weight, hessian = problem(correlated=correlated)
    cfg = small(outlier_percent=10, outlier_vector_len=2, outlier_centroids=8, group_num=2,
                residual_centroids=8, kmeans_iters=5)
    qweight, info = vptq_quantize(weight, hessian, cfg)
    parts = qweight.partitions
    assert [(p.start, p.end, p.vector_len, p.k, p.k_res) for p in parts] == [
        (0, 4, 2, 8, 0), (4, 22, 4, 16, 8), (22, 40, 4, 16, 8)]
    assert len(info["kmeans"]) == 3 + 2  # main codebooks, then the group partitions' residual ones
    # the residual pass improves on the first one, which improves on k-means alone
    assert info["proxy_error"] < info["proxy_error_first_pass"] < info["proxy_error_kmeans"]
    assert info["proxy_error"] == pytest.approx(proxy_error(weight, qweight.dequantize(), reference_hessian(hessian)))
    # bits: indices 2 * 12 * 4 * 3 (outliers: log2 8 = 3 bits per index, v = 2) + group indices
    # (log2 16 + log2 8) per 4 weights, codebooks fp16, perm 32 and scale + bias 32 per column
    numel = 24 * 40
    index = 12 * 4 * 3 + 2 * (6 * 18 * (4 + 3))
    books = 16 * (2 * 8 + 2 * 4 * (16 + 8))
    assert info["index_bits"] == pytest.approx(index / numel)
    assert info["paper_bits"] == pytest.approx((index + books) / numel)
    assert qweight.storage_bits() == index + books + 40 * (32 + 32)
    assert info["true_bits"] == pytest.approx(qweight.storage_bits() / numel)
    # centroids are fp16 already: what is stored is what the pass used, bit for bit
    stored = format_from_packed(qweight.pack(), qweight.meta())
    assert torch.equal(stored.dequantize(), qweight.dequantize())


def test_the_column_quantizer_keeps_the_residual_and_pads_short_vectors():
    book = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    columns = CodebookColumns(5, [(0, 2)], [book])
    q = columns.quantize(1, 0, torch.tensor([0.9, 1.2, 0.8, 0.1, -0.1]))
    assert torch.equal(q, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))  # rows 3, 4 + one zero pad -> 0
    assert torch.allclose(columns.residual[:, 1], torch.tensor([-0.1, 0.2, -0.2, 0.1, -0.1]))
    assert columns.indices[0][:, 1].tolist() == [1, 0]


def test_deterministic_for_a_seed(correlated):
    weight, hessian = problem(correlated=correlated)
    a, _ = vptq_quantize(weight, hessian, small())
    b, _ = vptq_quantize(weight, hessian, small())
    c, _ = vptq_quantize(weight, hessian, small(kmeans_seed=1))
    assert torch.equal(a.dequantize(), b.dequantize()) and not torch.equal(a.dequantize(), c.dequantize())


def test_block_hook_commits_codebook_weights_from_full_precision_hessians(make_block):
    block = make_block()
    method = VPTQ(small(vector_len=4, centroids=8, kmeans_iters=3))
    method.quantize_block(block)
    assert set(block.records) == set(block.linears)
    assert block.runs == ["down"]  # one pass: every Hessian is the full-precision block's
    for name, record in block.records.items():
        assert isinstance(record["qweight"], CodebookWeight)
        assert record["hessian_from"] == name and record["kmeans_seconds"] >= 0
        assert 0 <= record["kmeans_share"] <= 1 and record["true_bits"] > record["paper_bits"] > record["index_bits"]


@pytest.mark.parametrize("cfg", [small(), small(outlier_percent=10, outlier_vector_len=2, outlier_centroids=8,
                                                group_num=2, residual_centroids=8, enable_norm=False)])
def test_bits_from_the_shape_alone_match_the_stored_format(correlated, cfg):
    weight, hessian = problem(correlated=correlated)
    qweight, info = vptq_quantize(weight, hessian, cfg)
    bits = layer_bits(24, 40, cfg)
    assert bits["true"] == pytest.approx(qweight.bits_per_weight())
    assert (bits["index"], bits["paper"]) == pytest.approx((info["index_bits"], info["paper_bits"]))


def test_the_papers_bit_counts():
    """§8: LLaMA-2-7B v6 k4096 costs ~2.014 bits by VPTQ's count over one block (reported 2.02)."""
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    cfg = VPTQConfig(bits=2)
    paper = sum(layer_bits(o, i, cfg)["paper"] * o * i for o, i in shapes) / sum(o * i for o, i in shapes)
    assert paper == pytest.approx(2.0 + 7 * 16 * 6 * 4096 / sum(o * i for o, i in shapes), abs=2e-3)
    assert 2.01 < paper < 2.02


def test_the_bits_quoted_in_the_method_config_are_the_counted_ones():
    """conf/method/vptq.yaml's table: per bits default, (index, paper, true) on SmolLM2-135M and LLaMA-7B."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "conf" / "method" / "vptq.yaml").read_text()
    blocks = {
        "smol": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
        "llama": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)],
    }
    rows = re.findall(r"^#   bits=(\d) \(.*?\)\s+((?:[\d.]+\s+){5}[\d.]+)$", text, flags=re.M)
    assert [int(b) for b, _ in rows] == [2, 3, 4]
    for bits, numbers in rows:
        quoted = [float(x) for x in numbers.split()]
        cfg = VPTQConfig(bits=int(bits))
        counted = []
        for shapes in blocks.values():
            numel = sum(o * i for o, i in shapes)
            counted += [sum(layer_bits(o, i, cfg)[key] * o * i for o, i in shapes) / numel
                        for key in ("index", "paper", "true")]
        assert quoted == pytest.approx(counted, abs=6e-4)


@pytest.mark.parametrize(("override", "knob"), [("method.residual_centroids=1", "residual_centroids"),
                                                 ("method.kmeans_init=kmeans", "kmeans_init"),
                                                 ("bits=5", "bits=5")])
def test_bad_knobs_fail_before_the_model_loads(override, knob):
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.schema import validate
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=knob):
        validate(compose_config("method=vptq", override), load_group_option)
