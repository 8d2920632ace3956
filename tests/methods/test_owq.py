import pytest
import torch

from quantlab.methods import REGISTRY, ConfigError, quantizer
from quantlab.methods.gptq import GPTQ, GPTQConfig, gptq_quantize
from quantlab.methods.hessian import HessianAccumulator
from quantlab.methods.owq import OWQ, OWQConfig, column_order, owq_quantize, sensitivity, weak_column_count
from quantlab.methods.quantizer import Grid
from tests.conftest import LLAMA7B_LINEARS as LLAMA7B

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------
# Oracle: OWQ's quantizer, column sorting and solver written out literally from
# reference/methods.md §5 (signed symmetric levels, scalar loops over i and zp, masked updates).


class LiteralOWQQuantizer:
    def __init__(self, bits, sym=False, mse=True):
        self.bits, self.sym, self.mse = bits, sym, mse
        levels = 2**bits
        self.minq, self.maxq = (-(levels // 2), levels // 2 - 1) if sym else (0, levels - 1)
        self.levels = levels

    def _q(self, x_round, scale, zero):
        return scale * (torch.clamp(x_round + zero, self.minq, self.maxq) - zero)

    def find_params(self, x, num=100):
        eps = torch.tensor(1e-8)
        xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
        if self.mse:
            best = torch.zeros_like(xmin) + 1e10
            best_min, best_max = xmin.clone(), xmax.clone()
            if self.sym:
                xrange = torch.max(xmin.abs(), xmax)
                for i in range(1, num + 1):
                    tmax = xrange / num * i
                    scale = torch.max(tmax / -self.minq, eps).reshape(-1, 1)
                    score = (x - self._q(torch.round(x / scale), scale, 0)).abs().pow(2.4).mean(1)
                    best_max = torch.where(score < best, tmax, best_max)
                    best = torch.min(score, best)
                self.scale = torch.max(torch.max(best_max, torch.zeros_like(best_max)) / -self.minq, eps)
                self.zero = torch.zeros_like(self.scale)
            else:
                xrange = xmax - xmin
                tmin = torch.zeros_like(xmin)
                for i in range(1, num + 1):
                    tmax = xrange / num * i
                    scale = torch.max((tmax - tmin) / (self.maxq - self.minq), eps)
                    delta = scale.clone()
                    scale = scale.reshape(-1, 1)
                    x_round = torch.round(x / scale)
                    for zp in range(self.levels):
                        new_min, new_max = tmin - zp * delta, tmax - zp * delta
                        zero = torch.clamp(self.minq - torch.round(new_min / delta), self.minq, self.maxq)
                        score = (x - self._q(x_round, scale, zero.reshape(-1, 1))).abs().pow(2.4).mean(1)
                        best_min = torch.where(score < best, new_min, best_min)
                        best_max = torch.where(score < best, new_max, best_max)
                        best = torch.min(best, score)
                lo = torch.min(best_min, torch.zeros_like(best_min))
                hi = torch.max(best_max, torch.zeros_like(best_max))
                self.scale = torch.max((hi - lo) / (self.maxq - self.minq), eps)
                self.zero = torch.clamp(self.minq - torch.round(lo / self.scale), self.minq, self.maxq)
        else:
            if self.sym:
                xmax = torch.maximum(torch.abs(xmin), xmax)
                neg = xmin < 0
                xmin[neg] = -xmax[neg]
            dead = (xmin == 0) & (xmax == 0)
            xmin[dead], xmax[dead] = -1, 1
            if self.sym:
                self.scale, self.zero = xmax / -self.minq, torch.zeros_like(xmax)
            else:
                self.scale = (xmax - xmin) / self.maxq
                self.zero = torch.round(-xmin / self.scale)
        self.scale, self.zero = self.scale.reshape(-1, 1), self.zero.reshape(-1, 1)

    def quantize(self, x):
        return self._q(torch.round(x / self.scale), self.scale, self.zero)


def literal_owq(W, H, bits, n_out, sym=False, mse=True, groupsize=-1, actorder=False, frob=True):
    """Returns (Q with the weak columns, weak ids) as owq:main.py + owq:recon.py compute them."""
    W, H = W.clone().float(), H.clone()
    columns, blocksize = W.shape[1], 128
    n_nonout = columns - n_out
    if frob:
        tq = LiteralOWQQuantizer(bits, sym, mse)
        tq.find_params(W, num=40)
        frob_err = (W - tq.quantize(W)).pow(2).sum(dim=0)
    ids, out_ids = None, torch.tensor([], dtype=torch.long)
    if n_out == 0:
        if actorder:
            ids = torch.argsort(torch.diag(H), descending=True)
    else:
        score = torch.diag(H) * frob_err if frob else torch.diag(H)
        desc = torch.argsort(score, descending=True)
        mask = torch.full([columns], True)
        mask[desc[:n_out]] = False
        if actorder:
            ids = torch.cat([desc[n_out:], desc[:n_out]])
        else:
            ids = torch.cat([torch.arange(columns)[mask], desc[:n_out]])
        out_ids = desc[:n_out]
    if ids is not None:
        W, H = W[:, ids], H[ids][:, ids]
    quant = LiteralOWQQuantizer(bits, sym, mse)
    quant.find_params(W[:, :n_nonout])
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Q = torch.zeros_like(W)
    diag = torch.arange(columns)
    H[diag, diag] += 0.01 * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, n_nonout, blocksize):
        i2 = min(i1 + blocksize, n_nonout)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                quant.find_params(W[:, (i1 + i) : min(i1 + i + groupsize, columns - n_out)], num=40)
            q = quant.quantize(w.unsqueeze(1)).flatten()
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if ids is not None:
        Q[:, n_nonout:] = W[:, n_nonout:]
        Q = Q[:, torch.argsort(ids)]
    return Q, out_ids


# ---------------------------------------------------------------------------------------------


def problem(out_features=24, in_features=160, tokens=640, seed=0, correlated=None):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    weight[:, 5] *= 6  # a column worth keeping
    x = correlated(tokens, in_features, seed)
    acc = HessianAccumulator(in_features)
    acc.add(x.reshape(8, -1, in_features))
    return weight, acc.hessian, x


def owq_cfg(**overrides):
    cfg = OWQConfig(**{"bits": 3, "group_size": -1, **overrides})
    cfg.validate("owq")
    return cfg


def test_registered_with_reference_defaults():
    assert REGISTRY["owq"] is OWQ
    cfg = OWQConfig()
    assert (cfg.bits, cfg.group_size, cfg.tuning, cfg.frob_norm, cfg.sym, cfg.act_order, cfg.damp) == (
        3,
        -1,
        "mse",
        True,
        False,
        False,
        0.01,
    )
    assert cfg.true_sequential is False and cfg.effective_target_bits == pytest.approx(3.01)
    assert OWQConfig(bits=4).effective_target_bits == pytest.approx(4.01)
    cfg.validate("owq")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3, target_bits=4.01), "floor"),
        (dict(bits=4, target_bits=3.99), "floor"),
        (dict(target_bits=3.01, n_outliers=4), "not both"),
        (dict(n_outliers=-2), "n_outliers"),
        (dict(tuning="grid"), "tuning"),
        (dict(bits=8), "bits=8"),
        (dict(damp=0.0), "damp"),
        (dict(block_size=0), "block_size"),
        (dict(group_size=0), "group_size"),
    ],
)
def test_invalid_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        OWQConfig(**kwargs).validate("owq")


# --- the quantizer --------------------------------------------------------------------------


def awkward_rows(rows=10, cols=48, seed=3):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen))
    w[0] = 0  # all-zero row
    w[1] = w[1].abs()  # no negative weight
    w[2, 7] = 9.0  # an outlier worth clipping
    w[3] = -w[3].abs()  # no positive weight
    return w


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("mse, num", [(True, 40), (True, 17), (False, 100)])
def test_fit_owq_matches_literal_reference(bits, sym, mse, num):
    w = awkward_rows()
    literal = LiteralOWQQuantizer(bits, sym, mse)
    literal.find_params(w.clone(), num=num)
    scale, zero = quantizer.fit_owq(w, bits, sym=sym, mse=mse, num=num)
    assert torch.equal(scale, literal.scale.flatten())
    # signed symmetric levels are unsigned codes with the implicit zero 2^(b-1)
    assert torch.equal(zero, literal.zero.flatten() + (2 ** (bits - 1) if sym else 0))
    ours = quantizer.fake_quantize(w, scale[:, None], zero[:, None], 2**bits - 1)
    assert torch.equal(ours, literal.quantize(w))


def lp_score(w, scale, zero, bits, norm=2.4):
    return (
        (quantizer.fake_quantize(w, scale[:, None], zero[:, None], 2**bits - 1) - w).abs().pow(norm).mean(1)
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_mse_search_is_no_worse_than_minmax(bits, sym):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=gen) * 0.02
    w[:, :2] *= 10  # outliers make min-max wasteful
    mse = lp_score(w, *quantizer.fit_owq(w, bits, sym=sym, mse=True), bits)
    minmax = lp_score(w, *quantizer.fit_owq(w, bits, sym=sym, mse=False), bits)
    # the min-max range is one of the candidates (up to the last ulp of the rebuilt scale)
    assert torch.all(mse <= minmax * (1 + 1e-5))
    assert mse.mean() < 0.97 * minmax.mean()


def test_asymmetric_minmax_is_gptqs_grid():
    w = awkward_rows()
    for bits in (2, 3, 4):
        expected = quantizer.fit(w, Grid(bits, zero_in_range=True))
        ours = quantizer.fit_owq(w, bits, mse=False)
        assert all(torch.equal(a, b) for a, b in zip(ours, expected))


# --- column counts --------------------------------------------------------------------------

OPT67B = {  # OPT-6.7B: d = 4096, ffn 16384
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.out_proj": (4096, 4096),
    "fc1": (16384, 4096),
    "fc2": (4096, 16384),
}


@pytest.mark.parametrize("bits, target", [(3, 3.01), (4, 4.01)])
def test_llama7b_column_counts_match_the_reference(bits, target):
    counts = [weak_column_count("llama", name, c_in, bits, target) for name, (_, c_in) in LLAMA7B.items()]
    assert counts == [6, 6, 6, 6, 2, 2, 6]  # owq README / llmc gptq_owq_w_only.yml
    assert OWQConfig(bits=bits).effective_target_bits == pytest.approx(target)


def extra_bits(shapes, family, bits, target):
    """The papers' count (reference/methods.md §8): (16 - b) extra bits per fp16 value."""
    extra = sum(
        weak_column_count(family, name, c_in, bits, target) * c_out * (16 - bits)
        for name, (c_out, c_in) in shapes.items()
    )
    return extra / sum(c_out * c_in for c_out, c_in in shapes.values())


@pytest.mark.parametrize("shapes, family", [(LLAMA7B, "llama"), (OPT67B, "opt")])
@pytest.mark.parametrize("bits, target", [(3, 3.01), (3, 3.05), (4, 4.1)])
def test_per_role_ratios_spend_the_target_budget(shapes, family, bits, target):
    assert extra_bits(shapes, family, bits, target) == pytest.approx(target - bits, rel=0.12)


def test_counts_are_even_and_zero_at_the_integer_target():
    for c_in in (64, 576, 1536, 4096, 11008):
        for target in (3.0, 3.01, 3.1, 3.37):
            n = weak_column_count("llama", "mlp.down_proj", c_in, 3, target)
            assert n % 2 == 0 and (n == 0) == (
                target == 3.0 or c_in * 0.375 * 12 / 13 * (target - 3) / 7 < 0.5
            )
    with pytest.raises(ConfigError, match="family"):
        weak_column_count("bloom", "fc1", 64, 3, 3.01)


# --- the solver -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_out, group_size, act_order, mse, sym",
    [
        (6, -1, False, True, False),
        (6, -1, True, True, False),
        (4, 32, False, True, False),
        (4, 48, True, False, False),
        (6, -1, False, True, True),
        (0, -1, True, True, False),
        (2, -1, False, False, True),
    ],
)
def test_matches_literal_reference(n_out, group_size, act_order, mse, sym, correlated):
    """Exact: weak set, fp16 columns (rounded from the reference's fp32 values), and the codes."""
    weight, hessian, _ = problem(correlated=correlated)
    hessian[11, :] = hessian[:, 11] = 0  # a dead input: sensitivity 0, never weak
    expected, out_ids = literal_owq(weight, hessian, 3, n_out, sym, mse, group_size, act_order)
    cfg = owq_cfg(group_size=group_size, act_order=act_order, tuning="mse" if mse else "minmax", sym=sym)
    qweight, info = owq_quantize(weight, hessian, n_out, cfg)
    assert qweight.outlier_idx is None if n_out == 0 else torch.equal(qweight.outlier_idx.long(), out_ids)
    assert info["outlier_idx"] == out_ids.tolist() and info["n_outliers"] == n_out
    ours = qweight.dequantize()
    quantized = torch.ones(weight.shape[1], dtype=torch.bool)
    quantized[out_ids] = False
    assert torch.equal(ours[:, quantized], expected[:, quantized])
    assert torch.equal(ours[:, out_ids], expected[:, out_ids].half().float())
    assert torch.all(ours[:, 11] == 0)


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_no_weak_columns_and_minmax_is_gptq(group_size, act_order, correlated):
    weight, hessian, _ = problem(correlated=correlated)
    cfg = owq_cfg(group_size=group_size, act_order=act_order, tuning="minmax")
    ours, _ = owq_quantize(weight, hessian, 0, cfg)
    gptq, _ = gptq_quantize(weight, hessian, Grid(3), group_size, act_order=act_order)
    assert torch.equal(ours.codes, gptq.codes) and torch.equal(ours.dequantize(), gptq.dequantize())
    assert torch.equal(ours.scales, gptq.scales) and torch.equal(ours.zeros, gptq.zeros)
    assert ours.storage_bits() == gptq.storage_bits()


def test_weak_columns_are_the_most_sensitive_and_hold_updated_values(correlated):
    weight, hessian, x = problem(correlated=correlated)
    cfg = owq_cfg()
    n_out = 8
    qweight, info = owq_quantize(weight, hessian, n_out, cfg)
    # sensitivity recomputed independently: H_jj times the column's squared error under a per-row
    # b-bit MSE fit (40 grid points) of the whole weight
    scale, zero = quantizer.fit_owq(weight, 3, num=40)
    err = (weight - quantizer.fake_quantize(weight, scale[:, None], zero[:, None], 7)).pow(2).sum(0)
    scores = torch.diag(hessian) * err
    top = set(torch.topk(scores, n_out).indices.tolist())
    weak = qweight.outlier_idx.long()
    assert set(weak.tolist()) == top and 5 in top
    assert torch.all(scores[weak][:-1] >= scores[weak][1:])  # descending, as the reference stores them
    values = qweight.dequantize()[:, weak]
    assert values.dtype == torch.float32 and qweight.outlier_values.dtype == torch.float16
    # not the original weights: the solver's updates reached them ...
    assert (values - weight[:, weak]).abs().max() > 1e-3
    # ... and they compensate: a variant that keeps the original weights there does worse
    original = qweight.dequantize().clone()
    original[:, weak] = weight[:, weak]

    def out_err(q):
        return torch.linalg.norm(x @ weight.T - x @ q.T).item()

    assert out_err(qweight.dequantize()) < 0.95 * out_err(original)
    assert info["sensitivity_weak_share"] == pytest.approx(
        (scores[weak].sum() / scores.sum()).item(), rel=1e-5
    )


def test_weak_columns_beat_plain_gptq_and_cost_their_bits(correlated):
    weight, hessian, x = problem(correlated=correlated)

    def out_err(q):
        return torch.linalg.norm(x @ weight.T - x @ q.T).item()

    owq, _ = owq_quantize(weight, hessian, 8, owq_cfg())
    gptq, _ = gptq_quantize(weight, hessian, Grid(3))
    assert out_err(owq.dequantize()) < 0.8 * out_err(gptq.dequantize())
    rows, cols = weight.shape
    assert owq.storage_bits() == rows * (cols - 8) * 3 + rows * (16 + 3) + 8 * (16 * rows + 32)


def test_sensitivity_without_frob_norm_is_the_hessian_diagonal(correlated):
    weight, hessian, _ = problem(correlated=correlated)
    scores = sensitivity(weight, hessian, lambda w: None, 3, frob_norm=False)
    assert torch.equal(scores, torch.diag(hessian))
    order = column_order(scores, torch.diag(hessian), 4, act_order=False)
    assert order[:-4].tolist() == sorted(order[:-4].tolist())  # non-weak keep their original order


def test_groups_skip_the_weak_columns_and_stay_contiguous(correlated):
    weight, hessian, _ = problem(correlated=correlated)
    qweight, _ = owq_quantize(weight, hessian, 6, owq_cfg(group_size=32))
    assert qweight.scales.shape == (24, 5)  # 154 quantized columns: 4 x 32 + 26
    assert qweight.groups_contiguous  # runs of 32 over the non-weak columns: no g_idx to store
    rows, cols = weight.shape
    assert qweight.storage_bits() == rows * (cols - 6) * 3 + rows * 5 * (16 + 3) + 6 * (16 * rows + 32)
    act, _ = owq_quantize(weight, hessian, 6, owq_cfg(group_size=32, act_order=True))
    assert not act.groups_contiguous and act.storage_bits() == qweight.storage_bits() + 32 * cols


# --- the Method over a fake BlockView (tests/methods/conftest.py) -------------------------------


def test_method_counts_columns_per_role_and_records_them(make_block):
    block = make_block()
    cfg = owq_cfg(target_bits=3.9)
    OWQ(cfg).quantize_block(block)
    assert block.runs == ["down"]  # OWQ's default: no true-sequential, one pass
    expected = {"q": 4, "k": 4, "v": 4, "o": 4, "gate": 2, "up": 2, "down": 2}
    for name, record in block.records.items():
        n = weak_column_count("llama", name, block.linears[name].in_features, 3, 3.9)
        assert n == expected[name] == record["n_outliers"] == len(record["outlier_idx"])
        qweight = record["qweight"]
        assert torch.equal(block.linears[name].weight, qweight.dequantize())
        assert sorted(qweight.outlier_idx.tolist()) == sorted(record["outlier_idx"])
        assert record["target_bits"] == 3.9 and 0 < record["sensitivity_weak_share"] <= 1
        assert {"damp", "loss", "solver_seconds", "sensitivity_max", "sensitivity_median"} <= set(record)


def test_method_zero_weak_columns_minmax_equals_gptq_method(make_block):
    owq_block, gptq_block = make_block(seed=1), make_block(seed=1)
    OWQ(owq_cfg(n_outliers=0, tuning="minmax", group_size=16)).quantize_block(owq_block)
    gptq_cfg = GPTQConfig(bits=3, group_size=16, true_sequential=False)
    GPTQ(gptq_cfg).quantize_block(gptq_block)
    assert owq_block.runs == gptq_block.runs
    for name in owq_block.linears:
        assert torch.equal(owq_block.linears[name].weight, gptq_block.linears[name].weight)
        assert torch.equal(
            owq_block.records[name]["qweight"].codes, gptq_block.records[name]["qweight"].codes
        )


def test_method_true_sequential_and_too_many_columns(make_block):
    block = make_block()
    OWQ(owq_cfg(n_outliers=2, true_sequential=None)).quantize_block(block)
    assert block.runs == ["v", "o", "up", "down"]  # the family default, as GPTQ
    with pytest.raises(ConfigError, match="n_outliers"):
        OWQ(owq_cfg(n_outliers=32)).quantize_block(make_block())


def test_avg_bits_of_a_block_follow_the_target(make_block):
    block = make_block()
    OWQ(owq_cfg(target_bits=3.9)).quantize_block(block)
    qweights = [r["qweight"] for r in block.records.values()]
    numel = sum(q.numel for q in qweights)
    avg = sum(q.storage_bits() for q in qweights) / numel
    shapes = {name: tuple(lin.weight.shape) for name, lin in block.linears.items()}
    rows = sum(out for out, _ in shapes.values())
    n_cols = sum(r["n_outliers"] for r in block.records.values())
    overhead = (rows * (16 + 3) + 32 * n_cols) / numel
    assert avg == pytest.approx(3 + extra_bits(shapes, "llama", 3, 3.9) + overhead)
