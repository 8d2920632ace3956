"""AWQ's pieces in isolation: the grid, the scale formulas, the exact fold, the clip search, the config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.methods import awq_search
from quantlab.methods.awq import AWQConfig
from quantlab.methods.base import ConfigError
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import round_to_nearest


def awq_formula(group: torch.Tensor, bits: int) -> torch.Tensor:
    """llm-awq pseudo_quantize_tensor for one group, written out (raw min/max, no forced zero)."""
    maxq = 2**bits - 1
    lo, hi = group.min(), group.max()
    scale = (hi - lo).clamp(min=1e-5) / maxq
    zero = torch.clamp(-torch.round(lo / scale), 0, maxq)
    return (torch.clamp(torch.round(group / scale) + zero, 0, maxq) - zero) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_is_raw_minmax_per_row_and_group_with_a_shorter_last_group(bits):
    torch.manual_seed(bits)
    w = torch.randn(5, 200) * torch.linspace(0.1, 3, 200)
    w[1, :128] += 4.0  # a group with no negative weight: its zero-point is clamped to 0
    q = awq_search.pseudo_quantize(w, bits, 128)
    for row in range(5):
        for start, end in ((0, 128), (128, 200)):  # the last group has 72 columns and stays in its row
            expected = awq_formula(w[row, start:end], bits)
            torch.testing.assert_close(q[row, start:end], expected, rtol=0, atol=1e-6)
    # the committed weight uses the same grid: integer zero-points, exact storage bits
    qweight = round_to_nearest(w, awq_search.awq_grid(bits), 128)
    torch.testing.assert_close(qweight.dequantize(), q, rtol=0, atol=1e-6)
    assert qweight.zero_format == "int" and torch.equal(qweight.zeros, qweight.zeros.round())
    assert qweight.scales.shape == (5, 2)
    # the range is not widened to hold 0 (GPTQ's rule): an all-positive group keeps the step
    # (hi - lo) / maxq, and its zero-point -round(lo / step) < 0 is clamped to 0 (reference quirk)
    lo, hi = w[1, :128].min(), w[1, :128].max()
    torch.testing.assert_close(qweight.scales[1, 0], (hi - lo) / (2**bits - 1))
    assert qweight.zeros[1, 0] == 0
    assert qweight.storage_bits() == 5 * 200 * bits + 5 * 2 * (16 + bits)


def test_candidate_scales_follow_the_reference_normalisation():
    torch.manual_seed(0)
    x_mean = torch.rand(64) * 5 + 1e-3
    w_mean = torch.rand(64)
    assert torch.equal(awq_search.candidate_scales(x_mean, 0.0), torch.ones(64))
    for alpha in awq_search.alpha_grid(20):
        s = awq_search.candidate_scales(x_mean, alpha)
        raw = x_mean.pow(alpha).clamp(min=1e-4)
        torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
        assert abs(float(s.max() * s.min()) - 1) < 1e-5
        duo = awq_search.candidate_scales(x_mean, alpha, w_mean)
        raw = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        torch.testing.assert_close(duo, raw / (raw.max() * raw.min()).sqrt())
    assert awq_search.alpha_grid(20) == [r / 20 for r in range(20)] and max(awq_search.alpha_grid(20)) == 0.95


def test_weight_mean_normalises_each_row_group_by_its_own_max():
    a = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.5, -1.0]])
    b = torch.tensor([[3.0, 0.0, -6.0]])
    # group_size 2 on 3 columns: groups [0, 2) and the shorter [2, 3)
    expected_rows = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    got = awq_search.weight_mean([a, b], group_size=2)
    torch.testing.assert_close(got, expected_rows.mean(dim=0), rtol=1e-5, atol=1e-5)


def test_fold_into_a_norm_and_into_a_linear_is_exact():
    torch.manual_seed(1)
    norm = nn.LayerNorm(16)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.normal_()
    fcs = [nn.Linear(16, 8), nn.Linear(16, 4)]
    x = torch.randn(10, 16)
    before = [fc(norm(x)) for fc in fcs]
    s = torch.exp(torch.randn(16))
    awq_search.fold_scales(norm, fcs, s)
    for fc, ref in zip(fcs, before):
        torch.testing.assert_close(fc(norm(x)), ref, rtol=1e-5, atol=1e-5)

    # linear -> linear through a ReLU (OPT fc1 -> fc2): positively homogeneous, so exact
    fc1, fc2 = nn.Linear(16, 24), nn.Linear(24, 16)
    ref = fc2(torch.relu(fc1(x)))
    awq_search.fold_scales(fc1, [fc2], torch.exp(torch.randn(24)))
    torch.testing.assert_close(fc2(torch.relu(fc1(x))), ref, rtol=1e-5, atol=1e-5)

    # a wider linear (fused qkv): only its last len(s) rows and bias entries are divided
    fused = nn.Linear(16, 24)
    w, b = fused.weight.data.clone(), fused.bias.data.clone()
    s = torch.full((8,), 2.0)
    awq_search.fold_scales(fused, [nn.Linear(8, 4)], s)
    assert torch.equal(fused.weight.data[:16], w[:16]) and torch.equal(fused.bias.data[:16], b[:16])
    torch.testing.assert_close(fused.weight.data[16:], w[16:] / 2)
    with pytest.raises(ValueError, match="cannot fold 32 scales"):
        awq_search.fold_scales(fused, [nn.Linear(32, 4)], torch.ones(32))


def _clip_objective(
    w: torch.Tensor, x: torch.Tensor, m: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Per (row, group): mean over tokens of the squared change of the group's partial dot product."""
    out = torch.zeros(w.shape[0], m.shape[1])
    for g, start in enumerate(range(0, w.shape[1], group_size)):
        end = min(start + group_size, w.shape[1])
        for row in range(w.shape[0]):
            wg = w[row, start:end]
            q = awq_formula(torch.clamp(wg, -m[row, g], m[row, g]), bits)
            out[row, g] = ((x[:, start:end] @ q - x[:, start:end] @ wg) ** 2).mean()
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_never_increases_the_clip_objective_and_picks_the_best_shrink(bits, correlated):
    torch.manual_seed(bits)
    w = torch.randn(7, 40)
    w[:, 3] *= 6  # outliers make clipping worthwhile
    x = correlated(96, 40, seed=bits)
    result = awq_search.clip_search(w, x, bits, group_size=16, row_chunk=3)  # 16, 16 and a short 8
    m0 = torch.stack([w[:, s : s + 16].abs().amax(dim=1) for s in (0, 16, 32)], dim=1)
    unclipped = _clip_objective(w, x, m0, bits, 16)
    chosen = _clip_objective(w, x, result.max_val, bits, 16)
    assert (chosen <= unclipped + 1e-6).all()
    torch.testing.assert_close(result.err_unclipped, unclipped, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.err, chosen, rtol=1e-4, atol=1e-6)
    # brute force over the 10 shrinks: the chosen one is a minimiser
    tried = torch.stack([_clip_objective(w, x, m0 * (1 - k / 20), bits, 16) for k in range(10)])
    assert (chosen <= tried.min(dim=0).values * (1 + 1e-4) + 1e-7).all()
    assert (result.shrink > 0).any(), "with outliers, some group should be clipped"
    # the clamp the method applies is symmetric, per (row, group)
    clipped = awq_search.apply_clip(w, result.max_val, 16)
    assert (clipped[:, 32:].abs() <= result.max_val[:, 2:3] + 1e-7).all()


def test_subsample_tokens_strides_over_all_chunks_in_order():
    chunks = [torch.arange(i * 30, (i + 1) * 30, dtype=torch.float32).reshape(3, 5, 2) for i in range(3)]
    flat = torch.cat([c.reshape(-1, 2) for c in chunks])  # 45 tokens
    got = awq_search.subsample_tokens(chunks, n_tokens=10)  # stride 4
    assert torch.equal(got, flat[0::4])
    assert torch.equal(awq_search.subsample_tokens(chunks, n_tokens=512), flat)  # stride max(1, 0)


@pytest.mark.parametrize(
    ("overrides", "knob"),
    [
        ({"bits": 1}, "bits=1"),
        ({"bits": 9}, "bits=9"),
        ({"group_size": 0}, "group_size=0"),
        ({"n_grid": 0}, "n_grid=0"),
        ({"max_shrink": 1.0}, "max_shrink=1.0"),
        ({"max_shrink": 0.01}, "int\\(max_shrink \\* n_grid\\)"),
        ({"clip_tokens": 0}, "clip_tokens=0"),
        ({"clip_row_chunk": 0}, "clip_row_chunk=0"),
    ],
)
def test_bad_configs_raise_naming_the_knob(overrides, knob):
    with pytest.raises(ConfigError, match=knob):
        AWQConfig(**overrides).validate("awq")


def test_defaults_are_llm_awq_and_the_yaml_matches_the_dataclass():
    from quantlab.experiments.run.schema import validate_method
    from tests.conftest import compose_config

    cfg = AWQConfig()
    assert (cfg.duo_scaling, cfg.scale, cfg.clip, cfg.n_grid, cfg.max_shrink, cfg.clip_tokens) == (
        False,
        True,
        True,
        20,
        0.5,
        512,
    )
    AWQConfig(max_shrink=0.01, clip=False).validate("awq")  # no clip: the shrink grid does not matter
    from omegaconf import OmegaConf

    composed = compose_config("method=awq", "bits=3", "method.duo_scaling=true")
    name, config = validate_method(OmegaConf.to_container(composed, resolve=True)["method"])
    assert name == "awq" and config.bits == 3 and config.group_size == 128 and config.duo_scaling
    assert Grid(3, sym=False, zero_in_range=False) == awq_search.awq_grid(3)


def test_awq_on_the_fake_block_scales_up_to_down_exactly_then_quantizes(make_block):
    """The FakeBlockView's tiny block has one exact group, up -> down (down(silu(gate) * up))."""
    from quantlab.methods.awq import AWQ
    from quantlab.methods.block import ScalingGroup

    view = make_block(n_sequences=4, tokens=16, batch_size=2)
    view.scaling_groups = (ScalingGroup("up", ("down",), "down"),)
    before = torch.cat([view.module(chunk) for chunk in view.inputs.split(2)])
    method = AWQ(AWQConfig(bits=3, group_size=16))
    state = method.scale_block(view)
    with torch.no_grad():
        torch.testing.assert_close(view.module(view.inputs), before, rtol=1e-5, atol=1e-5)
    assert state.info["down"]["scale"]["loss"] <= state.info["down"]["scale"]["loss_alpha0"]
    method.clip_and_commit(view, state)
    assert set(view.records) == set(view.linears)
    assert view.records["down"]["clip"]["err"] <= view.records["down"]["clip"]["err_unclipped"]
    # the no-clip rule is by name ("q_", "k_", ...): the fake block's "q" and "k" do not match it
    assert all("err" in view.records[name]["clip"] for name in view.linears)
