"""HQQ: a literal transcription of its reference loop, the hqq library itself, exact bits, knobs."""

import pytest
import torch

from quantlab.methods.base import ConfigError
from quantlab.methods.hqq import HQQConfig, hqq_quantize


def transcribed_reference(w, bits, group_size, round_zero, iters=20, lp_norm=0.7, beta=10.0):
    """hqq/core/quantize.py Quantizer.quantize (axis=1) + optimize.py optimize_weights_proximal_legacy,
    written out loop by loop as the oracle (returns codes, scale, zero per group)."""
    W = w.float().reshape([-1, group_size])
    _min = W.min(axis=1, keepdim=True)[0]
    _max = W.max(axis=1, keepdim=True)[0]
    max_v = round(2**bits - 1)
    denom = _max - _min
    scale = max_v / denom
    scale = torch.where(denom.abs() <= 1e-4, torch.full_like(scale, 1.0), scale).clamp(max=2e4)
    zero = -_min * scale
    if round_zero:
        zero = torch.round(zero)
    best_error = torch.tensor(torch.inf)
    for _ in range(iters):
        W_q = torch.round(W * scale + zero).clamp_(0, max_v)
        W_r = (W_q - zero) / scale
        x = W - W_r
        W_e = torch.sign(x) * torch.relu(torch.abs(x) - (1.0 / beta) * torch.pow(torch.abs(x), lp_norm - 1))
        zero = torch.mean(W_q - (W - W_e) * scale, axis=1, keepdim=True)
        current_error = torch.abs(W - W_r).mean().float()
        if current_error < best_error:
            best_error = current_error
        else:
            break
    W_q = torch.round(W * scale + zero).clamp_(0, max_v)
    return W_q, 1.0 / scale, zero


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_matches_the_transcribed_reference(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 192) * 0.02
    q = hqq_quantize(w, HQQConfig(bits=bits))
    codes, scale, zero = transcribed_reference(w, bits, 64, round_zero=bits == 4)
    assert torch.equal(q.codes.float().reshape(-1, 64), codes)
    assert torch.allclose(q.scales.reshape(-1, 1), scale, rtol=1e-6, atol=0)
    assert torch.allclose(q.zeros.reshape(-1, 1), zero, rtol=0, atol=1e-5)
    assert q.zero_format == "float" and q.info["iterations"] >= 1


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_matches_the_hqq_library(bits):
    hqq_quantize_module = pytest.importorskip("hqq.core.quantize", reason="hqq (the `baselines` extra)")
    torch.manual_seed(10 + bits)
    w = torch.randn(96, 576) * 0.03
    q = hqq_quantize(w, HQQConfig(bits=bits))
    # HQQ's defaults (BaseQuantizeConfig): group_size 64, axis 1, round_zero at 4 bits only
    codes, meta = hqq_quantize_module.Quantizer.quantize(
        w, nbits=bits, group_size=64, axis=1, round_zero=bits == 4, optimize=True, bitpack=False,
        device="cpu", compute_dtype=torch.float32,
    )
    assert torch.equal(q.codes.float().reshape(-1, 64), codes)
    assert torch.equal(q.scales.reshape(-1, 1), meta["scale"])
    assert torch.equal(q.zeros.reshape(-1, 1), meta["zero"])
    weight = (codes - meta["zero"]) * meta["scale"]  # HQQ's dequantize
    assert torch.equal(q.dequantize(), weight.reshape(w.shape))


def test_the_solver_beats_the_plain_min_max_grid_in_lp():
    torch.manual_seed(3)
    w = torch.randn(128, 256) * 0.02
    solved = hqq_quantize(w, HQQConfig(bits=3))
    plain = hqq_quantize(w, HQQConfig(bits=3, optimize=False, round_zero=False))
    lp = lambda q: (w - q.dequantize()).abs().pow(0.7).sum()  # noqa: E731 - the loss HQQ minimizes
    assert lp(solved) < lp(plain)


@pytest.mark.parametrize(("bits", "expected"), [(4, 4.5), (3, 3.5), (2, 2.5)])
def test_exact_bits_fp16_scale_and_zero_per_group_of_64(bits, expected):
    assert hqq_quantize(torch.randn(64, 576), HQQConfig(bits=bits)).bits_per_weight() == expected


def test_a_width_the_group_does_not_divide_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="method.group_size=64"):
        hqq_quantize(torch.randn(4, 576), HQQConfig(group_size=128))


@pytest.mark.parametrize(
    ("knobs", "message"),
    [({"bits": 5}, "bits=5"), ({"group_size": 60}, "multiple of 8"), ({"group_size": -1}, "multiple of 8"),
     ({"iters": 0}, "iters"), ({"lp_norm": 2.0}, "lp_norm"), ({"beta": 0.0}, "beta"), ({"kappa": 0.5}, "kappa")],
)
def test_bad_configs_name_the_knob(knobs, message):
    with pytest.raises(ConfigError, match=message):
        HQQConfig(**knobs).validate("hqq")


@pytest.mark.slow
def test_a_smollm2_linear_is_the_hqq_library_bit_for_bit(smollm2):
    hqq_quantize_module = pytest.importorskip("hqq.core.quantize", reason="hqq (the `baselines` extra)")
    weight = smollm2.model.model.layers[3].self_attn.q_proj.weight.detach()  # [576, 576]
    q = hqq_quantize(weight, HQQConfig(bits=3))
    codes, meta = hqq_quantize_module.Quantizer.quantize(
        weight, nbits=3, group_size=64, axis=1, round_zero=False, optimize=True, bitpack=False,
        device="cpu", compute_dtype=torch.float32,
    )
    assert torch.equal(q.dequantize(), ((codes - meta["zero"]) * meta["scale"]).reshape(weight.shape))
