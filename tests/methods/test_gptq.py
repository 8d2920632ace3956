import copy

import pytest
import torch

from quantlab.methods import REGISTRY, ConfigError, quantizer
from quantlab.methods.column_solver import Damping, inverse_hessian_chol
from quantlab.methods.gptq import GPTQ, GPTQConfig, HessianNotPositiveDefinite, gptq_quantize
from quantlab.methods.hessian import HessianAccumulator
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import round_to_nearest


@pytest.fixture(autouse=True)
def single_thread():
    """The matrices here are tiny: extra OpenMP threads only spin, and on a loaded 2-core machine
    that made this file ~10x slower. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Oracle: the reference's quantizer and `fasterquant`, written out literally from
# reference/methods.md §1.3 and §3.1 (scalar loops, in-place masked updates, a mutable quantizer).


class LiteralQuantizer:
    def __init__(self, bits, sym, mse=False, norm=2.4, grid=100, maxshrink=0.8):
        self.maxq, self.sym, self.mse = 2**bits - 1, sym, mse
        self.norm, self.grid, self.maxshrink = norm, grid, maxshrink
        self.scale = self.zero = None

    def find_params(self, x):
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if self.sym:
            xmax = torch.maximum(torch.abs(xmin), xmax)
            tmp = xmin < 0
            if torch.any(tmp):
                xmin[tmp] = -xmax[tmp]
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp] = -1
        xmax[tmp] = +1
        self.scale = (xmax - xmin) / self.maxq
        if self.sym:
            self.zero = torch.full_like(self.scale, (self.maxq + 1) / 2)
        else:
            self.zero = torch.round(-xmin / self.scale)
        if self.mse:
            best = torch.full([x.shape[0]], float("inf"))
            for i in range(int(self.maxshrink * self.grid)):
                p = 1 - i / self.grid
                xmin1, xmax1 = p * xmin, p * xmax
                scale1 = (xmax1 - xmin1) / self.maxq
                zero1 = torch.round(-xmin1 / scale1) if not self.sym else self.zero
                q = self._fake(x, scale1.unsqueeze(1), zero1.unsqueeze(1))
                q -= x
                q.abs_()
                q.pow_(self.norm)
                err = torch.sum(q, 1)
                tmp = err < best
                if torch.any(tmp):
                    best[tmp] = err[tmp]
                    self.scale[tmp] = scale1[tmp]
                    self.zero[tmp] = zero1[tmp]
        self.scale, self.zero = self.scale.reshape(-1, 1), self.zero.reshape(-1, 1)

    def _fake(self, x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)
        return scale * (q - zero)

    def quantize(self, x):
        return self._fake(x, self.scale, self.zero)


def literal_fasterquant(
    W,
    H,
    bits,
    sym,
    groupsize=-1,
    blocksize=128,
    percdamp=0.01,
    actorder=False,
    static_groups=False,
    mse=False,
    refit_updated=False,
    codes_out=None,
):
    """Returns (Q, total loss). `refit_updated=True` is NOT the reference: it fits a dynamic group
    on the in-block-updated weights, to show that the stale-fit quirk changes the result.
    `codes_out` (a [rows, columns] tensor), when given, receives the integer codes in the original
    column order; the reference never materializes them, they are for comparisons."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    quant = LiteralQuantizer(bits, sym, mse)
    quant.find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            g = copy.deepcopy(quant)
            g.find_params(W[:, i : i + groupsize])
            groups.append(g)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
    Losses, Q = torch.zeros_like(W), torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        if refit_updated:
                            quant.find_params(torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :groupsize])
                        else:
                            quant.find_params(W[:, (i1 + i) : (i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quant = groups[idx // groupsize]
            q = quant.quantize(w.unsqueeze(1)).flatten()
            if codes_out is not None:
                code = torch.clamp(torch.round(w.unsqueeze(1) / quant.scale) + quant.zero, 0, quant.maxq)
                codes_out[:, perm[i1 + i] if actorder else i1 + i] = code.flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q, torch.sum(Losses).item()


# ---------------------------------------------------------------------------------------------


def problem(out_features=48, in_features=256, tokens=1024, seed=0, correlated=None):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    weight[:, :3] *= 8  # a few outlier columns
    x = correlated(tokens, in_features, seed)
    acc = HessianAccumulator(in_features)
    acc.add(x.reshape(8, -1, in_features))
    return weight, acc.hessian, x


def test_registered_with_reference_defaults():
    assert REGISTRY["gptq"] is GPTQ
    cfg = GPTQConfig()
    assert (
        cfg.sym,
        cfg.act_order,
        cfg.static_groups,
        cfg.damp,
        cfg.block_size,
        cfg.true_sequential,
        cfg.mse,
    ) == (
        False,
        False,
        False,
        0.01,
        128,
        None,
        False,
    )
    cfg.validate("gptq")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=5),
        dict(bits=16),
        dict(block_size=0),
        dict(damp=0.0),
        dict(static_groups=True, group_size=-1),
        dict(group_size=0),
        dict(max_damp_retries=-1),
    ],
)
def test_invalid_configs(kwargs):
    with pytest.raises(ConfigError):
        GPTQConfig(**kwargs).validate("gptq")


@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_identity_hessian_is_rtn(group_size, sym, bits):
    weight = torch.randn(40, 200) * 0.1
    grid = Grid(bits, sym=sym, zero_in_range=True)
    rtn = round_to_nearest(weight, grid, group_size).dequantize()
    qweight, info = gptq_quantize(weight, torch.eye(200), grid, group_size)
    assert torch.equal(qweight.dequantize(), rtn)
    if group_size != -1:  # static groups are fitted on the original order, so act-order changes nothing
        static, _ = gptq_quantize(
            weight, torch.eye(200), grid, group_size, act_order=True, static_groups=True
        )
        assert torch.equal(static.dequantize(), rtn)


def output_error(x, weight, q):
    return torch.linalg.norm(x @ weight.T - x @ q.T).item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_correlated_inputs(bits, group_size, act_order, correlated):
    weight, hessian, x = problem(correlated=correlated)
    grid = Grid(bits, zero_in_range=True)
    qweight, _ = gptq_quantize(weight, hessian, grid, group_size, act_order=act_order)
    rtn = round_to_nearest(weight, grid, group_size).dequantize()
    ratio = output_error(x, weight, qweight.dequantize()) / output_error(x, weight, rtn)
    if (bits, group_size, act_order) == (2, 128, False):
        # A property of the reference, not a bug (the literal oracle agrees): each group of 128 is
        # fitted on W *after* the lazy updates of the previous blocks, and at 2 bits those updates
        # widen the range enough that GPTQ lands at RTN's level (0.94-1.08 x RTN over seeds here).
        # Static groups or act-order bring it back to ~0.6-0.8 x.
        assert ratio < 1.1
    else:
        assert ratio < 0.9


@pytest.mark.parametrize(
    "group_size, act_order, static_groups, mse, sym",
    [
        (-1, False, False, False, False),
        (-1, True, False, True, True),
        (32, False, False, False, False),
        (32, True, False, False, True),
        (32, True, True, False, False),
        (32, False, False, True, False),
        (48, True, False, False, False),
        (128, True, False, False, False),
        (256, False, False, False, True),
    ],
)
def test_matches_literal_reference_loop(group_size, act_order, static_groups, mse, sym, correlated):
    """Exact match, including the stale dynamic-group fit (G=32, 48 < B=128) and G > B (256)."""
    weight, hessian, _ = problem(out_features=24, in_features=320, correlated=correlated)
    hessian[7, :] = hessian[:, 7] = 0  # one dead input
    expected, expected_loss = literal_fasterquant(
        weight, hessian, 3, sym, group_size, 128, 0.01, act_order, static_groups, mse
    )
    qweight, info = gptq_quantize(
        weight, hessian, Grid(3, sym=sym), group_size, 128, 0.01, act_order, static_groups, mse
    )
    assert torch.equal(qweight.dequantize(), expected)
    assert info["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert info["dead_columns"] == 1 and torch.all(expected[:, 7] == 0)


def test_dynamic_group_quirk_is_reproduced(correlated):
    """With G < B, a group starting mid-block is fitted on W without the in-block updates. A variant
    that refits on the updated weights gives a different Q; with G = B the two coincide."""
    weight, hessian, _ = problem(out_features=24, in_features=256, correlated=correlated)
    ours = gptq_quantize(weight, hessian, Grid(3), 32)[0].dequantize()
    stale, _ = literal_fasterquant(weight, hessian, 3, False, 32)
    refit, _ = literal_fasterquant(weight, hessian, 3, False, 32, refit_updated=True)
    assert torch.equal(ours, stale) and not torch.equal(ours, refit)
    ours128 = gptq_quantize(weight, hessian, Grid(3), 128)[0].dequantize()
    assert torch.equal(ours128, literal_fasterquant(weight, hessian, 3, False, 128, refit_updated=True)[0])


def test_g_idx_layouts(correlated):
    weight, hessian, _ = problem(out_features=16, in_features=96, correlated=correlated)
    grid, G = Grid(4), 32
    perm = torch.argsort(torch.diag(hessian), descending=True)
    dynamic, _ = gptq_quantize(weight, hessian, grid, G, act_order=True)
    expected = torch.empty(96, dtype=torch.int32)
    expected[perm] = (torch.arange(96) // G).to(torch.int32)
    assert torch.equal(dynamic.g_idx, expected) and not dynamic.groups_contiguous
    static, _ = gptq_quantize(weight, hessian, grid, G, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx, torch.arange(96, dtype=torch.int32) // G) and static.groups_contiguous
    plain, _ = gptq_quantize(weight, hessian, grid, G)
    assert torch.equal(plain.g_idx, torch.arange(96, dtype=torch.int32) // G)
    for qweight in (dynamic, static, plain):
        assert qweight.codes.dtype == torch.uint8 and int(qweight.codes.max()) <= grid.maxq
        assert qweight.scales.shape == (16, 3)


@pytest.mark.parametrize("act_order", [False, True])
def test_group_size_not_dividing_in_features(act_order, correlated):
    weight, hessian, _ = problem(out_features=8, in_features=576, tokens=768, correlated=correlated)
    qweight, _ = gptq_quantize(weight, hessian, Grid(3), 128, act_order=act_order)
    assert qweight.scales.shape == (8, 5)  # 4 x 128 + 64
    assert torch.bincount(qweight.g_idx.long()).tolist() == [128, 128, 128, 128, 64]
    expected_bits = 8 * 576 * 3 + 8 * 5 * (16 + 3) + (32 * 576 if act_order else 0)
    assert qweight.storage_bits() == expected_bits
    expected, _ = literal_fasterquant(weight, hessian, 3, False, 128, actorder=act_order)
    assert torch.equal(qweight.dequantize(), expected)


def test_dead_columns_are_zeroed_and_recorded(correlated):
    weight, _, x = problem(out_features=16, in_features=64, correlated=correlated)
    x[:, [5, 40]] = 0
    acc = HessianAccumulator(64)
    acc.add(x)
    qweight, info = gptq_quantize(weight, acc.hessian, Grid(4), 32, act_order=True)
    assert info["dead_columns"] == 2
    assert torch.all(qweight.dequantize()[:, [5, 40]] == 0)


def test_singular_hessian_retries_are_recorded_then_fail():
    v = torch.tensor([1.0, 2.0, -1.0, 3.0, 1.0])
    hessian = torch.outer(v, v)  # rank 1: a tiny damp leaves it exactly singular in fp32
    weight = torch.randn(4, 5)
    with pytest.raises(HessianNotPositiveDefinite, match="after 0 retries"):
        gptq_quantize(weight, hessian, Grid(4), damp=1e-10, max_damp_retries=0)
    qweight, info = gptq_quantize(weight, hessian, Grid(4), damp=1e-10, max_damp_retries=3)
    assert info["damp_retries"] == 1 and info["damp"] == pytest.approx(0.0025 + 1e-10)
    assert torch.isfinite(qweight.dequantize()).all()
    _, damp, retries = inverse_hessian_chol(hessian + torch.eye(5), Damping(0.01))
    assert (damp, retries) == (0.01, 0)


def test_duplicated_input_columns_are_handled(correlated):
    weight, _, x = problem(out_features=16, in_features=64, correlated=correlated)
    x[:, 1] = x[:, 0]
    x[:, 2] = x[:, 0]
    acc = HessianAccumulator(64)
    acc.add(x)
    qweight, info = gptq_quantize(weight, acc.hessian, Grid(3), 32, damp=1e-9, max_damp_retries=5)
    assert torch.isfinite(qweight.dequantize()).all() and info["damp_retries"] <= 5


def test_mse_fit_matches_literal_loop():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 64, generator=gen) * torch.exp(torch.randn(12, 1, generator=gen))
    weight[0] = 0  # all-zero row: (-1, 1)
    weight[1] = weight[1].abs()  # no negative weight: the symmetric quirk keeps lo = 0
    weight[2, 5] = 9.0  # an outlier worth clipping
    for bits in (2, 3, 4):
        for sym in (False, True):
            literal = LiteralQuantizer(bits, sym, mse=True)
            literal.find_params(weight.clone())
            scale, zero = quantizer.fit_mse(weight, Grid(bits, sym=sym))
            assert torch.equal(scale, literal.scale.flatten()) and torch.equal(zero, literal.zero.flatten())
            plain = LiteralQuantizer(bits, sym)
            plain.find_params(weight.clone())
            assert not torch.equal(scale, plain.scale.flatten())  # the search did shrink some range
    with pytest.raises(ValueError):
        quantizer.fit_mse(weight, Grid(4, zero_in_range=False))


# --- the Method over a fake BlockView (tests/methods/conftest.py) -------------------------------


def quantize(block, **overrides):
    cfg = GPTQConfig(**{"bits": 3, "group_size": 16, **overrides})
    cfg.validate("gptq")
    GPTQ(cfg).quantize_block(block)
    return block


def test_true_sequential_one_pass_per_group_stopped_at_its_last_linear(make_block):
    block = quantize(make_block())
    # execution order q,k,v,o,gate,up,down; groups [k,v,q] [o] [up,gate] [down]
    assert block.runs == ["v", "o", "up", "down"]
    assert block.calls["down"] == block.n_sequences  # only the last pass reaches it
    assert set(block.records) == set(block.linears)
    for name, record in block.records.items():
        assert torch.equal(block.linears[name].weight, record["qweight"].dequantize())
        assert record["hessian_sequences"] == block.n_sequences
        assert record["seconds"] == pytest.approx(
            record["forward_seconds"] + record["hessian_seconds"] + record["solver_seconds"]
        )
        assert {"damp", "damp_retries", "dead_columns", "loss"} <= set(record)


def test_sequences_counted_across_uneven_chunks(make_block):
    # 7 sequences in chunks of 3, 3, 1, each hook call sees [chunk sequences, tokens, in]
    block = quantize(make_block(n_sequences=7, batch_size=3))
    assert block.calls["down"] == 3
    assert all(record["hessian_sequences"] == 7 for record in block.records.values())


def test_family_default_and_override_of_true_sequential(make_block):
    opt_like = quantize(make_block(true_sequential_default=False))
    assert opt_like.runs == ["down"]
    forced = quantize(make_block(true_sequential_default=False), true_sequential=True)
    assert forced.runs == ["v", "o", "up", "down"]
    # later groups see the quantized earlier groups, so the o projection's result differs
    assert not torch.equal(opt_like.linears["o"].weight, forced.linears["o"].weight)


def test_two_runs_are_bit_identical(make_block):
    first = quantize(make_block(seed=1), act_order=True, mse=True)
    second = quantize(make_block(seed=1), act_order=True, mse=True)
    for name in first.linears:
        assert torch.equal(first.linears[name].weight, second.linears[name].weight)
        assert first.records[name]["loss"] == second.records[name]["loss"]


def test_tf32_disabled_while_solving_and_restored(make_block):
    seen = []
    block = make_block()
    original_run = block.run

    def run(hooks=None, stop_after=None, last_pass=False):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        original_run(hooks, stop_after)

    block.run = run
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        quantize(block)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen and not any(seen)


def test_linears_declared_to_share_an_input_share_one_hessian_and_stop_early(make_block):
    from quantlab.methods.block import ScalingGroup

    block = make_block()
    block.scaling_groups = (
        ScalingGroup("norm1", ("q", "k", "v"), "attn"), ScalingGroup("norm2", ("gate", "up"), "mlp"),
    )
    quantize(block)
    # each pass stops at the first linear of a shared input: q and gate are never computed in them
    assert block.runs == ["q", "o", "gate", "down"]
    assert {block.records[n]["hessian_from"] for n in ("q", "k", "v")} == {"q"}
    assert block.records["up"]["hessian_from"] == "gate"
