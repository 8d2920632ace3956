"""QAT (methods/qat.py): the straight-through and LSQ gradients against hand-derived formulas, and
the method through the driver on tiny-llama: lr = 0 reproduces its init bit for bit, a few steps
lower the calibration loss, the final weights are on the grid, bad configs are refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantlab.experiments.run.pipeline import quantize_model
from quantlab.experiments.run.schema import validate_method
from quantlab.kernels.grid import fake_quantize, fake_quantize_ste
from quantlab.methods.base import ConfigError
from quantlab.methods.gptq import GPTQ, GPTQConfig
from quantlab.methods.qat import (
    QAT,
    FakeQuantLinear,
    QATConfig,
    batch_order,
    learning_rate,
    lsq_gradient_scale,
)
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import RTN, RTNConfig, round_to_nearest
from tests.conftest import _load

CPU = torch.device("cpu")


def structured_calibration(n: int = 8, seqlen: int = 32, vocab: int = 48, seed: int = 0) -> torch.Tensor:
    """Sequences over a few dozen token ids: a random model's uniform prediction over 49k ids can
    learn that much, so training has a loss to lower."""
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def qat_run(loaded, calib: torch.Tensor, **options):
    config = QATConfig(**{"bits": 3, "group_size": 32, "steps": 2, "batch_size": 4, **options})
    config.validate("qat")
    return quantize_model(loaded.model, loaded.architecture, QAT(config), calib, CPU, batch_size=4, progress=False)


def test_ste_gradient_is_the_identity_inside_the_range_and_zero_outside():
    scale, zero, maxq = torch.tensor(0.25), torch.tensor(3.0), 7  # codes 0..7: values -0.75 .. 1.0
    w = torch.tensor([-2.0, -0.8, -0.74, -0.3, 0.0, 0.12, 0.6, 0.99, 1.05, 1.2, 3.0], requires_grad=True)
    upstream = torch.linspace(1.0, 2.0, w.numel())
    (fake_quantize_ste(w, scale, zero, maxq) * upstream).sum().backward()
    codes = torch.round(w.detach() / scale) + zero
    inside = (codes >= 0) & (codes <= maxq)
    assert inside.any() and (~inside).any()
    assert torch.equal(w.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    # and the values are fake_quantize's, bit for bit
    assert torch.equal(fake_quantize_ste(w, scale, zero, maxq).detach(), fake_quantize(w.detach(), scale, zero, maxq))


def test_lsq_scale_gradient_matches_the_hand_derived_formula():
    torch.manual_seed(0)
    linear = nn.Linear(40, 6, bias=False)
    fmt = round_to_nearest(linear.weight, Grid(3, sym=False, zero_in_range=False), 16)  # groups 16, 16, 8
    with torch.no_grad():
        linear.weight.mul_(1.6)  # push some weights past the fitted range: clamped codes
    q = FakeQuantLinear(linear, fmt, learn_scales=True)
    upstream = torch.randn(6, 40)
    (q.weight_hat(linear.weight, q.scale) * upstream).sum().backward()
    w, s, z, index = linear.weight.detach(), fmt.scales, fmt.zeros, fmt.g_idx.long()
    v = w / s[:, index]
    codes = torch.round(v) + z[:, index]
    clamped = (codes < 0) | (codes > 7)
    assert clamped.any() and (~clamped).any()
    # d w_hat / d s: round(w/s) - w/s inside, (clamped code - zero) outside; times LSQ's g
    per_weight = torch.where(clamped, codes.clamp(0, 7) - z[:, index], torch.round(v) - v)
    expected = torch.zeros_like(s).index_add_(1, index, per_weight * upstream)
    g = lsq_gradient_scale(fmt)
    assert g == 1 / math.sqrt(16 * 7)  # N = 16 weights per scale, Q_P = 7 levels above 0 (asymmetric)
    assert torch.allclose(q.scale.grad, expected * g, rtol=1e-5, atol=1e-7)


def lsq_linear(bias: bool = False) -> tuple[nn.Linear, FakeQuantLinear]:
    torch.manual_seed(1)
    linear = nn.Linear(40, 6, bias=bias)
    fmt = round_to_nearest(linear.weight, Grid(3, sym=False, zero_in_range=False), 16)
    with torch.no_grad():
        linear.weight.mul_(1.6)
    return linear, FakeQuantLinear(linear, fmt, learn_scales=True)


def test_the_recomputing_linear_has_autograd_gradients_and_keeps_no_weight_sized_tensor():
    """The training forward (weight_hat rebuilt in the backward) against plain autograd through
    weight_hat and F.linear: the same output and gradients for x, W, s and the bias; and what it
    saves for the backward is the input and references to the latent W and s, nothing weight-sized."""
    grads = []
    for lean in (True, False):
        linear, q = lsq_linear(bias=True)
        x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, _s=saved: _s.append(t) or t, lambda t: t):
            y = q.forward(x) if lean else nn.functional.linear(x, q.weight_hat(linear.weight, q.scale), linear.bias)
        (y * torch.linspace(-1, 1, 6)).sum().backward()
        grads.append((y.detach(), x.grad, linear.weight.grad, q.scale.grad, linear.bias.grad))
        weight_sized = [t for t in saved if t.numel() >= linear.weight.numel() and t.shape != x.shape]
        if lean:
            assert all(t.data_ptr() == linear.weight.data_ptr() for t in weight_sized)  # the latent itself
        else:
            assert len(weight_sized) >= 3  # what the lean path avoids
    for lean, plain in zip(*grads):
        assert torch.allclose(lean, plain, rtol=1e-5, atol=1e-6)


def test_lsq_gradient_scale_of_a_symmetric_grid_counts_the_positive_levels():
    fmt = round_to_nearest(torch.randn(4, 64), Grid(4, sym=True, zero_in_range=False), -1)
    assert lsq_gradient_scale(fmt) == 1 / math.sqrt(64 * 7)  # zero 8 of 0..15: 7 levels above it


def test_schedule_and_batch_order():
    assert learning_rate(0, 10, 0.1, "cosine") == 0.1 and learning_rate(5, 10, 0.1, "cosine") == pytest.approx(0.05)
    assert learning_rate(7, 10, 0.1, "constant") == 0.1
    batches = batch_order(6, 4, steps=5, seed=1)
    assert [len(b) for b in batches] == [4, 2, 4, 2, 4]  # a batch never spans two epochs
    assert sorted(torch.cat(batches[:2]).tolist()) == list(range(6))
    assert all(torch.equal(a, b) for a, b in zip(batches, batch_order(6, 4, steps=5, seed=1)))


@pytest.mark.parametrize("learn_scales", [False, True])
def test_lr_zero_reproduces_rtn_bit_for_bit(learn_scales):
    calib = structured_calibration()
    rtn_model, qat_model = _load("tiny-llama"), _load("tiny-llama")
    rtn = quantize_model(rtn_model.model, rtn_model.architecture, RTN(RTNConfig(bits=3, group_size=32)), None, CPU,
                         progress=False)
    qat = qat_run(qat_model, calib, lr=0.0, learn_scales=learn_scales, optimizer="adam")
    assert set(qat.formats) == set(rtn.formats) and len(qat.formats) == 14
    for name, fmt in rtn.formats.items():
        assert torch.equal(qat.formats[name].codes, fmt.codes)
        assert torch.equal(qat.formats[name].scales, fmt.scales)
        assert torch.equal(qat.formats[name].zeros, fmt.zeros)
        assert torch.equal(qat_model.model.get_submodule(name).weight, rtn_model.model.get_submodule(name).weight)
    assert qat.avg_bits == rtn.avg_bits
    assert qat.fine_tune["calib_loss_final"] == qat.fine_tune["calib_loss_init"]
    for layer in qat.layers:  # nothing moved, and the record says so
        info = layer.info["qat"]
        assert info["latent_shift_steps_max"] == info["scale_change_mean"] == info["codes_changed"] == 0


@pytest.mark.parametrize(("fixture", "options"), [
    ("tiny_llama", {}),
    ("tiny_llama", {"learn_scales": True}),
    ("tiny_llama", {"train": "all_linears_and_norms", "optimizer": "sgd", "lr": 0.5, "schedule": "constant"}),
    ("tiny_opt", {"train": "all_linears_and_norms"}),  # LayerNorms and biases
])
def test_a_few_steps_lower_the_calibration_loss_and_end_on_the_grid(fixture, options, request):
    tiny_llama = request.getfixturevalue(fixture)
    calib = structured_calibration()
    embeddings = tiny_llama.model.get_input_embeddings().weight.detach().clone()
    flags = [p.requires_grad for p in tiny_llama.model.parameters()]
    report = qat_run(tiny_llama, calib, **{"steps": 8, "lr": 3e-3, "optimizer": "adam", **options})
    record = report.fine_tune
    assert record["steps"] == 8 and len(record["curve"]) == 8 and record["tokens_seen"] == 8 * 4 * 32
    assert [row[0] for row in record["curve"]] == list(range(1, 9))
    assert record["calib_loss_final"] < record["calib_loss_init"] - 0.05, record
    changed = 0.0
    for layer in report.layers:
        fmt = report.formats[layer.name]
        codes = fmt.codes.float()
        assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 7
        index = fmt.g_idx.long()
        rebuilt = fmt.scales[:, index] * (codes - fmt.zeros[:, index])
        assert torch.equal(tiny_llama.model.get_submodule(layer.name).weight, rebuilt)
        assert layer.storage_bits == fmt.storage_bits() and layer.info["qat"]["init"] == "rtn"
        assert layer.bits_per_weight == fmt.bits_per_weight()
        info = layer.info["qat"]
        changed += info["codes_changed"]
        # the drift record: latents moved (Adam / SGD at this lr), scales only when they train,
        # and no code can flip while every latent stays within half a step at fixed scales
        assert 0 < info["latent_shift_steps_mean"] <= info["latent_shift_steps_max"]
        assert (info["scale_change_mean"] > 0) == bool(options.get("learn_scales"))
        if info["scale_change_mean"] == 0 and info["latent_shift_steps_max"] < 0.5:
            assert info["codes_changed"] == 0
    assert changed > 0
    assert torch.equal(tiny_llama.model.get_input_embeddings().weight, embeddings)  # frozen
    assert [p.requires_grad for p in tiny_llama.model.parameters()] == flags  # restored as loaded


def test_init_gptq_starts_from_gptq_weights():
    calib = structured_calibration()
    gptq_model, qat_model = _load("tiny-llama"), _load("tiny-llama")
    gptq = quantize_model(gptq_model.model, gptq_model.architecture, GPTQ(GPTQConfig(bits=3, group_size=32)), calib,
                          CPU, batch_size=4, progress=False)
    qat = qat_run(qat_model, calib, init="gptq", lr=0.0)
    rtn = round_to_nearest(_load("tiny-llama").model.get_submodule(gptq.layers[-1].name).weight,
                           RTNConfig(bits=3, group_size=32).grid(), 32)
    assert not torch.equal(gptq.formats[gptq.layers[-1].name].codes, rtn.codes)  # GPTQ is not RTN here
    for name, fmt in gptq.formats.items():
        assert torch.equal(qat.formats[name].codes, fmt.codes) and torch.equal(qat.formats[name].scales, fmt.scales)
        assert torch.equal(qat_model.model.get_submodule(name).weight, gptq_model.model.get_submodule(name).weight)


@pytest.mark.parametrize(("knob", "value", "message"), [
    ("steps", 0, "steps=0 must be a positive integer"),
    ("steps", -3, "steps=-3 must be a positive integer"),
    ("optimizer", "lion", "optimizer='lion' is not valid; choose one of: adam, adamw, sgd"),
    ("init", "qat", "init='qat' cannot start from itself"),
    ("init", "owq", "init='owq' is not valid; choose one of: rtn, gptq, awq"),
    ("train", "everything", "train='everything' is not valid"),
    ("lr", -1.0, "lr=-1.0 must be >= 0"),
    ("sym", True, "init='awq' has only an asymmetric grid"),
])
def test_bad_configs_are_refused_with_the_knob_named(knob, value, message):
    section = {"name": "qat", "bits": 3, "group_size": 32, knob: value}
    if knob == "sym":
        section["init"] = "awq"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_method(section)


def test_bits_the_init_cannot_do_are_refused():
    with pytest.raises(ConfigError, match="cannot quantize to bits=5"):
        validate_method({"name": "qat", "bits": 5, "group_size": 32})


def test_static_activation_ranges_are_refused_before_loading():
    from quantlab.experiments.run.checks import check_run
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.schema import validate
    from tests.conftest import compose_config

    run = validate(compose_config("model=tiny-llama", "method=qat", "bits=3", "act=int8_static"), load_group_option)
    with pytest.raises(ConfigError, match="before method=qat trains the weights"):
        check_run(run)


def test_module_rules_cannot_set_training_knobs():
    from quantlab.experiments.run.module_rules import parse_rules

    base = QATConfig(bits=3, group_size=32)
    with pytest.raises(ConfigError, match=r"modules\[0\] sets \['steps'\] of qat, which hold for the whole run"):
        parse_rules([{"match": "down_proj", "method": {"steps": 5}}], "qat", base)
    assert parse_rules([{"match": "down_proj", "bits": 4}], "qat", base)[0].config.bits == 4
