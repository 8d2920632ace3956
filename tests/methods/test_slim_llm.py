import pytest
import torch
import torch.nn.functional as F

from quantlab.methods import REGISTRY, ConfigError
from quantlab.methods.gptq import GPTQ, GPTQConfig, gptq_quantize
from quantlab.methods.hessian import HessianAccumulator
from quantlab.methods.quantizer import Grid
from quantlab.methods.slim_llm import (
    KLSearch,
    SliMLLM,
    SliMLLMConfig,
    chol_inverse_upper,
    group_salience,
    salience_hessian,
    slim_quantize,
    sqc_fit,
)
from tests.methods.conftest import TinyBlock, correlated_inputs

pytestmark = pytest.mark.usefixtures("single_thread")


def problem(rows=16, cols=64, n=256, seed=0, dead=()):
    gen = torch.Generator().manual_seed(seed)
    x = correlated_inputs(n, cols, seed)
    x[:, list(dead)] = 0
    acc = HessianAccumulator(cols)
    acc.add(x)
    w = torch.randn(rows, cols, generator=gen) * torch.exp(torch.randn(1, cols, generator=gen) * 0.5)
    return w, acc.hessian, x


# ---------------------------------------------------------------------------------------------
# Oracles: the reference's SBA salience, KL search, SQC fit and SliMGPTQ.fasterquant, written out
# step for step from reference/methods.md §6 in the reference's order of operations (in-place
# edits of H, NaN masks with nansum, per-sample errors, labels 0/1/2, the sym flag of its quantizer).


def literal_get_salience(H, w, blocksize):
    """get_salience: edits H in place (dead -> 1, +0.01 on the diagonal), then W^2 / U_jj^2 sums."""
    h = H
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    idx = torch.arange(h.shape[0])
    h[idx, idx] += 0.01
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    out = []
    for st in range(0, w.shape[1], blocksize):
        ed = min(st + blocksize, w.shape[1])
        out.append(torch.sum(w[:, st:ed] ** 2 / (torch.diag(hinv[st:ed, st:ed]).reshape((1, -1))) ** 2).item())
    return out


def literal_block_quantize(w, bits):
    if bits == 1:
        zero = torch.mean(w, dim=1)
        scale = torch.mean(torch.abs(w), dim=1)
        b = torch.zeros_like(w) + w
        b -= zero[:, None]
        out = torch.sign(b) * scale[:, None]
        out += zero[:, None]
        return out
    maxq = torch.tensor(2**bits - 1)
    tmp = torch.zeros(w.shape[0])
    xmin = torch.minimum(w.min(1)[0], tmp)
    xmax = torch.maximum(w.max(1)[0], tmp)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, +1
    scale = ((xmax - xmin) / maxq).reshape(-1, 1)
    zero = torch.round(-xmin.reshape(-1, 1) / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def literal_activation_aware_search(salience, w, blocksize, bit_width, inp, out):
    """One sample: errors for k = 1 .. G_n // 2 - 1; `out` keeps its [1, T, C_out] shape."""
    order = torch.tensor(salience, dtype=torch.float64).argsort(stable=True).tolist()
    errors = []
    for i in range(1, len(salience) // 2):
        labels = [1] * len(salience)
        for j in order[:i]:
            labels[j] = 0
        for j in order[-i:]:
            labels[j] = 2
        tmp = torch.zeros_like(w)
        for g, st in enumerate(range(0, w.shape[1], blocksize)):
            ed = min(st + blocksize, w.shape[1])
            tmp[:, st:ed] = literal_block_quantize(w[:, st:ed], bit_width - 1 + labels[g])
        t1 = F.softmax(inp @ tmp.T, dim=-1).clamp(min=1e-6)
        t2 = F.softmax(out, dim=-1).clamp(min=1e-6)
        errors.append(F.kl_div(torch.log(t2), t1, reduction="batchmean").item())
    return errors


class LiteralSQC:
    """utils/mixed_quantizer.py Quantizer: starts sym=True; fit(w, Hinv1, bits); quantize(w)."""

    def __init__(self, lambda_salience=1.0):
        self.sym, self.lam = True, lambda_salience

    def fit(self, w, hinv1, bits):
        self.bits = bits
        if bits == 1:
            self.scale, self.zero = torch.mean(torch.abs(w), dim=1), torch.mean(w, dim=1)
            return
        maxq = torch.tensor(2**bits - 1)
        sens = w**2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
        z = (sens - torch.mean(sens)) / torch.std(sens)
        t = torch.min(sens[torch.abs(z) > 2])
        mask0, mask1 = sens < t, sens >= t
        tmp = torch.zeros(w.shape[0])
        xmin = torch.minimum(w.min(1)[0], tmp)
        xmax = torch.maximum(w.max(1)[0], tmp)
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1, +1
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if self.sym else torch.round(-xmin / scale)
        best = torch.full([w.shape[0]], float("inf"))
        ps = torch.cat([torch.ones(1), torch.linspace(1.0, 1.1, 51)[1:], torch.linspace(1.0, 0.9, 51)[1:]])
        nan = torch.tensor(float("nan"))
        for p in ps:
            xmin1, xmax1 = p * xmin, p * xmax
            scale1 = (xmax1 - xmin1) / maxq
            zero1 = torch.round(-xmin1 / scale1) if not self.sym else zero
            wq = scale1[:, None] * (torch.clamp(torch.round(w / scale1[:, None]) + zero1[:, None], 0, maxq) - zero1[:, None])
            e_ns = torch.where(mask0, wq, nan) - torch.where(mask0, w, nan)
            e_s = torch.where(mask1, wq, nan) - torch.where(mask1, w, nan)
            err = torch.nansum(e_ns.abs().pow(2.4), 1) + self.lam * torch.nansum(e_s.abs().pow(2.4), 1)
            better = err < best
            if torch.any(better):
                best[better] = err[better]
                scale[better] = scale1[better]
                zero[better] = zero1[better]
        self.scale, self.zero, self.maxq = scale, zero, maxq

    def quantize(self, w):
        if self.bits == 1:
            return torch.sign(w - self.zero) * self.scale + self.zero
        return self.scale * (torch.clamp(torch.round(w / self.scale) + self.zero, 0, self.maxq) - self.zero)


def literal_fasterquant(W, H, k, bit_width, blocksize, percdamp=0.01, widths=None):
    """SliMGPTQ.fasterquant with k groups moved (search or --salient_block mode), or the saved
    `widths` (every group asymmetric). H is used as given (search mode: already edited)."""
    W, H = W.clone().float(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(W.shape[1])
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    quant = LiteralSQC()
    if widths is None:
        sal = []
        for st in range(0, W.shape[1], blocksize):
            ed = min(st + blocksize, W.shape[1])
            sal.append(torch.sum(W[:, st:ed] ** 2 / (torch.diag(hinv[st:ed, st:ed]).reshape((1, -1))) ** 2).item())
        order = torch.tensor(sal, dtype=torch.float64).argsort(stable=True).tolist()
        labels = [1] * len(sal)
        for i in order[:k]:
            labels[i] = 0
        for i in order[-k:] if k else []:
            labels[i] = 2
    used = []
    for g, st in enumerate(range(0, W.shape[1], blocksize)):
        ed = min(st + blocksize, W.shape[1])
        W1, Q1, Err1 = W[:, st:ed].clone(), torch.zeros(W.shape[0], ed - st), torch.zeros(W.shape[0], ed - st)
        hinv1 = hinv[st:ed, st:ed]
        if widths is None:
            bits = bit_width - 1 + labels[g]
            if labels[g] != 0:
                quant.sym = False
        else:
            bits = widths[g]
            quant.sym = False
        used.append(bits)
        quant.fit(W1, hinv1, bits)
        for i in range(ed - st):
            q = quant.quantize(W1[:, i])
            Q1[:, i] = q
            err = (W1[:, i] - q) / hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, st:ed] = Q1
        W[:, ed:] -= Err1.matmul(hinv[st:ed, ed:])
    return W, used


# ---------------------------------------------------------------------------------------------


def test_registered_with_reference_defaults():
    assert REGISTRY["slim_llm"] is SliMLLM
    cfg = SliMLLMConfig()
    assert (cfg.bits, cfg.group_size, cfg.lambda_salience, cfg.damp) == (2, 128, 1.0, 0.01)
    with pytest.raises(ConfigError, match="group_size"):
        SliMLLMConfig(group_size=-1).validate("slim_llm")
    with pytest.raises(ConfigError, match="bits"):
        SliMLLMConfig(bits=8).validate("slim_llm")
    with pytest.raises(ConfigError, match="search_inputs"):
        SliMLLMConfig(search_inputs="cached").validate("slim_llm")


@pytest.mark.parametrize(("bits", "group_size"), [(2, 16), (3, 16), (4, 24)])
def test_every_group_at_n_bits_without_range_search_is_gptq_without_act_order(bits, group_size):
    w, H, _ = problem(dead=(5,))
    cfg = SliMLLMConfig(bits=bits, group_size=group_size, range_search=False, lambda_salience=1.0, n_moved=0)
    ours, info = slim_quantize(w, H, cfg, k=0)
    ref, ref_info = gptq_quantize(w, H, Grid(bits, sym=False), group_size=group_size, block_size=group_size)
    assert set(info["allocation"]) == {bits}
    assert torch.equal(ours.dequantize(), ref.dequantize())
    assert torch.equal(ours.codes, ref.codes) and torch.equal(ours.scales, ref.scales)
    assert torch.equal(ours.zeros, ref.zeros)
    assert info["loss"] == ref_info["loss"]


def test_block_with_no_moved_group_and_no_range_search_is_gptq_block(make_block):
    ours, ref = make_block(seed=1), make_block(seed=1)
    SliMLLM(SliMLLMConfig(bits=3, group_size=8, n_moved=0, range_search=False)).quantize_block(ours)
    GPTQ(GPTQConfig(bits=3, group_size=8, block_size=8, true_sequential=False)).quantize_block(ref)
    for name in ours.linears:
        assert torch.equal(ours.linears[name].weight, ref.linears[name].weight), name


def test_sba_salience_matches_the_reference_and_keeps_the_in_place_quirk():
    w, H, _ = problem(dead=(3, 40))
    expected = literal_get_salience(H.clone(), w, 16)
    H_search = salience_hessian(H)
    ours = group_salience(w, chol_inverse_upper(H_search), 16)
    assert ours.tolist() == expected
    edited = H.clone()
    literal_get_salience(edited, w, 16)
    assert torch.equal(H_search, edited)  # the H the GPTQ step then sees


def test_kl_search_matches_the_reference_per_sample():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=True)
    x = correlated_inputs(3 * 20, 64, 2).reshape(3, 20, 64)
    _, H, _ = problem(cols=64)
    salience = group_salience(linear.weight, chol_inverse_upper(salience_hessian(H)), 8)
    for bits in (2, 3):
        search = KLSearch(linear, salience, bits, 8)
        search.add(x[:2])  # a chunk of two sequences
        search.add(x[2:])
        w = linear.weight.detach()
        expected = [
            literal_activation_aware_search(salience.tolist(), w, 8, bits, seq, linear(seq).unsqueeze(0))
            for seq in x
        ]
        assert search.ks == [1, 2, 3]
        # the same candidates; the products built incrementally (KLSearch), so float32 rounding apart
        torch.testing.assert_close(torch.tensor(search.errors), torch.tensor(expected), rtol=1e-4, atol=1e-6)
        mean = torch.tensor(expected, dtype=torch.float64).mean(0).tolist()
        assert search.best_k() == mean.index(min(mean)) + 1


def test_incremental_kl_search_holds_over_many_candidates():
    # 32 groups (LLaMA-7B's 4096-wide rows at g128): 15 candidates, each built from the one before
    # by two group updates; the accumulated products stay within float32 rounding of the
    # reference's full product per candidate, and the argmin is the reference's
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 48, bias=False)
    x = correlated_inputs(2 * 24, 256, 3).reshape(2, 24, 256)
    salience = torch.rand(32, dtype=torch.float64)
    search = KLSearch(linear, salience, 3, 8)
    search.add(x)
    w = linear.weight.detach()
    expected = [literal_activation_aware_search(salience.tolist(), w, 8, 3, seq, linear(seq).unsqueeze(0)) for seq in x]
    assert len(search.ks) == 15
    torch.testing.assert_close(torch.tensor(search.errors), torch.tensor(expected), rtol=1e-4, atol=1e-6)
    mean = torch.tensor(expected, dtype=torch.float64).mean(0).tolist()
    assert search.best_k() == mean.index(min(mean)) + 1


def test_kl_search_with_too_few_groups_keeps_every_group_at_n():
    linear = torch.nn.Linear(24, 8, bias=False)
    search = KLSearch(linear, torch.rand(3, dtype=torch.float64), 2, 8)
    search.add(torch.randn(1, 5, 24))
    assert search.curve() == [] and search.best_k() == 0  # the reference crashes on min([]) here


@pytest.mark.parametrize("n_groups", [4, 5])
def test_kl_search_with_one_candidate_takes_it_without_scoring(n_groups):
    # k runs over 1 .. G_n // 2 - 1: with 4 or 5 groups only k = 1 exists, so its argmin is known
    # without the pass the reference spends on it (SmolLM2's 576-wide inputs at g128 are such)
    linear = torch.nn.Linear(8 * n_groups, 8, bias=False)
    search = KLSearch(linear, torch.rand(n_groups, dtype=torch.float64), 3, 8)
    search.add(torch.randn(2, 5, 8 * n_groups))
    assert search.ks == [1] and search.errors == [] and search.curve() == [] and search.best_k() == 1


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sqc_fit_matches_the_reference(bits, sym):
    w, H, _ = problem(rows=12, cols=16, seed=bits)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + torch.eye(16))), upper=True)
    ref = LiteralSQC()
    ref.sym = sym
    ref.fit(w, u, bits)
    scale, zero, found = sqc_fit(w, torch.diag(u), bits, 1.0, sym, True)
    assert found and torch.equal(scale, ref.scale) and torch.equal(zero, ref.zero)


def test_sqc_lambda_weights_the_salient_elements():
    w, H, _ = problem(rows=12, cols=16, seed=7)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + torch.eye(16))), upper=True)
    ref = LiteralSQC(lambda_salience=5.0)
    ref.sym = False
    ref.fit(w, u, 2)
    scale, zero, _ = sqc_fit(w, torch.diag(u), 2, 5.0, False, True)
    assert torch.equal(scale, ref.scale) and torch.equal(zero, ref.zero)


def test_too_many_moved_groups_are_refused():
    w, H, _ = problem(cols=32)
    with pytest.raises(ConfigError, match="n_moved"):
        slim_quantize(w, H, SliMLLMConfig(bits=3, group_size=8, n_moved=3), 3)


def test_sqc_without_outliers_does_not_crash():
    w = torch.ones(4, 8)  # every element equally salient: no |z| > 2 (the reference crashes)
    scale, zero, found = sqc_fit(w, torch.ones(8), 2, 1.0, False, True)
    assert not found and torch.isfinite(scale).all()


@pytest.mark.parametrize(("bits", "k"), [(2, 1), (2, 2), (3, 2), (3, 3)])
def test_layer_matches_the_reference_fasterquant_in_search_mode(bits, k):
    w, H, _ = problem(rows=16, cols=96, seed=k, dead=(7,))
    H_search = salience_hessian(H)  # what get_salience left behind
    ref, ref_widths = literal_fasterquant(w, H_search, k, bits, 16)
    ours, info = slim_quantize(w, H_search, SliMLLMConfig(bits=bits, group_size=16), k)
    assert info["allocation"] == ref_widths
    assert torch.equal(ours.dequantize(), ref)
    if bits == 2:
        assert ours.binary_one_bit and info["allocation_counts"]["1"] == k


def test_layer_with_a_given_allocation_matches_the_reference_loaded_mode():
    w, H, _ = problem(rows=16, cols=96, seed=3)
    widths = [2, 4, 3, 3, 2, 4]
    ref, _ = literal_fasterquant(w, H, 0, 3, 16, widths=widths)
    ours, info = slim_quantize(w, H, SliMLLMConfig(bits=3, group_size=16), None, widths)
    assert info["allocation"] == widths and info["sym_quirk_groups"] == []
    assert torch.equal(ours.dequantize(), ref)


@pytest.mark.parametrize("bits", [2, 3])
def test_block_search_average_width_is_exactly_n_in_every_layer(bits):
    torch.manual_seed(0)
    module = TinyBlock(hidden=64, intermediate=96)
    from tests.methods.conftest import FakeBlockView

    block = FakeBlockView(module, correlated_inputs(4 * 12, 64, 1).reshape(4, 12, 64), batch_size=2)
    SliMLLM(SliMLLMConfig(bits=bits, group_size=8)).quantize_block(block)
    assert block.runs == ["down"]  # one Hessian pass for every linear; the search reuses its inputs
    for name, record in block.records.items():
        widths = record["allocation"]
        assert sum(widths) == bits * len(widths), name
        assert record["k"] >= 1 and len(record["kl_curve"]) == len(widths) // 2 - 1
        assert record["hessian_diag_plus"] == 0.01 and record["allocation_source"] == "search"
        assert record["allocation_counts"][str(bits - 1)] == record["allocation_counts"][str(bits + 1)] == record["k"]
        qweight = record["qweight"]
        assert qweight.group_bits.tolist() == widths
        rows, cols = qweight.shape
        zero_bits = sum(16 if b == 1 else b for b in widths)
        expected = rows * 8 * sum(widths) + rows * len(widths) * 16 + rows * zero_bits + 8 * len(widths)
        assert qweight.storage_bits() == expected


def test_stored_search_inputs_give_the_recomputing_pass_bits():
    """search_inputs=stored keeps the Hessian pass's inputs instead of the reference's second pass:
    the same tensors in the same order, so the same KL curves, allocations and weights."""
    from tests.methods.conftest import FakeBlockView

    blocks, given = {}, {}
    for mode in ("stored", "recomputed"):
        torch.manual_seed(0)
        module = TinyBlock(hidden=64, intermediate=96)
        block = FakeBlockView(module, correlated_inputs(4 * 12, 64, 1).reshape(4, 12, 64), batch_size=2)
        given[mode] = _outputs_given_to_the_search(block, SliMLLMConfig(bits=2, group_size=8, search_inputs=mode))
        blocks[mode] = block
    assert blocks["recomputed"].runs == ["down", None] and blocks["stored"].runs == ["down"]
    # the forward's own outputs reach the search (the reference's `out`); the stored pass stops at
    # down's input, so down's Y alone is recomputed
    assert given["recomputed"] == dict.fromkeys(blocks["stored"].linears, [True, True])
    assert given["stored"] == {**dict.fromkeys(blocks["stored"].linears, [True, True]), "down": [False, False]}
    for name, record in blocks["stored"].records.items():
        other = blocks["recomputed"].records[name]
        assert record["kl_curve"] == other["kl_curve"] and record["allocation"] == other["allocation"], name
        assert torch.equal(record["qweight"].dequantize(), other["qweight"].dequantize()), name


def test_only_searched_linears_keep_their_outputs():
    """At 4 groups per row (64 wide, g16) k = 1 is forced and nothing is scored: the stored pass
    keeps no output for those linears (the search of down_proj, 96 wide: 6 groups, recomputes its
    Y past the pass's stop)."""
    from tests.methods.conftest import FakeBlockView

    torch.manual_seed(0)
    block = FakeBlockView(TinyBlock(hidden=64, intermediate=96), correlated_inputs(4 * 12, 64, 1).reshape(4, 12, 64),
                          batch_size=2)
    given = _outputs_given_to_the_search(block, SliMLLMConfig(bits=2, group_size=16))
    assert given == dict.fromkeys(block.linears, [False, False])
    assert block.records["down"]["kl_candidates"] == 2 and block.records["q"]["kl_curve"] == []


def _outputs_given_to_the_search(block, config) -> dict[str, list[bool]]:
    """Quantize `block`; per linear, whether each KLSearch.add call got the forward's output."""
    from quantlab.methods import slim_llm

    add, given = slim_llm.KLSearch.add, {}
    names = {linear.weight.data_ptr(): name for name, linear in block.linears.items()}

    def spy(search, inputs, outputs=None):
        given.setdefault(names[search.native_weight.data_ptr()], []).append(outputs is not None)
        add(search, inputs, outputs)

    slim_llm.KLSearch.add = spy
    try:
        SliMLLM(config).quantize_block(block)
    finally:
        slim_llm.KLSearch.add = add
    return given


def test_a_stored_output_changed_in_place_is_recomputed():
    """The stored search keeps each linear's output without a copy; a block that changes one in
    place afterwards (here: up's output, scaled) must not hand the search the changed tensor."""
    from tests.methods.conftest import FakeBlockView

    class InPlaceBlock(TinyBlock):
        def forward(self, x):
            attn = self.q(x) * torch.sigmoid(self.k(x)) + self.v(x)
            h = x + self.o(attn)
            return h + self.down(F.silu(self.gate(h)) * self.up(h).mul_(3.0))

    records = {}
    for mode in ("stored", "recomputed"):  # recomputed: the search sees up's output inside its hook
        torch.manual_seed(0)
        block = FakeBlockView(InPlaceBlock(hidden=64, intermediate=96),
                              correlated_inputs(4 * 12, 64, 1).reshape(4, 12, 64), batch_size=2)
        SliMLLM(SliMLLMConfig(bits=2, group_size=8, search_inputs=mode)).quantize_block(block)
        records[mode] = block.records
    assert records["stored"]["up"]["kl_curve"] == records["recomputed"]["up"]["kl_curve"]


def test_a_given_allocation_skips_the_search(make_block):
    block = make_block(seed=2)
    table = {0: {name: [2, 4, 3, 3][: len(range(0, lin.in_features, 8))] for name, lin in block.linears.items()}}
    table[0]["down"] = [3, 2, 4, 3, 3, 3]
    method = SliMLLM(SliMLLMConfig(bits=3, group_size=8))
    method.use_allocation(table)
    method.quantize_block(block)
    assert block.runs == ["down"]
    assert block.records["down"]["allocation"] == [3, 2, 4, 3, 3, 3]
    assert block.records["q"]["allocation_source"] == "file"
    method.use_allocation({0: {"q": [3, 3, 3, 3]}})
    with pytest.raises(ConfigError, match="no widths"):
        method.quantize_block(make_block(seed=2))
