"""SmoothQuant against literal transcriptions of mit-han-lab/smoothquant (smooth.py's factors and
fold, fake_quant.py's per-channel weight grid, calibration.py's running channel max), and the
fold leaving a tiny LLaMA's and OPT's logits unchanged before any weight is quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlab.experiments.run.pipeline import quantize_model
from quantlab.methods import REGISTRY, ConfigError
from quantlab.methods.observers import MinMaxObserver
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import round_to_nearest
from quantlab.methods.smoothquant import SmoothQuant, SmoothQuantConfig, channel_absmax, smoothing_factors

CPU = torch.device("cpu")


# ---- literal transcriptions (fp32 here; the reference runs in the model's dtype) -------------------


def literal_smooth_ln_fcs_llama_like(ln_weight, fcs, act_scales, alpha=0.5):
    weight_scales = torch.cat([fc.abs().max(dim=0, keepdim=True)[0] for fc in fcs], dim=0)
    weight_scales = weight_scales.max(dim=0)[0].clamp(min=1e-5)
    scales = (act_scales.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5)
    ln_weight = ln_weight.clone().div_(scales)
    fcs = [fc.clone().mul_(scales.view(1, -1)) for fc in fcs]
    return scales, ln_weight, fcs


def literal_quantize_weight_per_channel_absmax(w, n_bits=8):
    w = w.clone()
    scales = w.abs().max(dim=-1, keepdim=True)[0]
    q_max = 2 ** (n_bits - 1) - 1
    scales.clamp_(min=1e-5).div_(q_max)
    w.div_(scales).round_().mul_(scales)
    return w


def literal_stat_tensor(act_scales, tensor):
    hidden_dim = tensor.shape[-1]
    tensor = tensor.view(-1, hidden_dim).abs().detach()
    comming_max = torch.max(tensor, dim=0)[0].float()
    return comming_max if act_scales is None else torch.max(act_scales, comming_max)


# ---- pieces -------------------------------------------------------------------------------


def test_registered_with_the_reference_defaults():
    assert REGISTRY["smoothquant"] is SmoothQuant and SmoothQuant.propagation == "float"
    cfg = SmoothQuantConfig()
    assert (cfg.bits, cfg.group_size, cfg.alpha) == (8, -1, 0.5)
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuantConfig(alpha=1.5).validate("smoothquant")


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_factors_and_fold_match_the_reference(alpha):
    gen = torch.Generator().manual_seed(0)
    act = torch.rand(64, generator=gen) * torch.exp(3 * torch.randn(64, generator=gen))  # outlier channels
    act[3] = 0.0  # a dead channel: the 1e-5 floor
    fcs = [torch.randn(n, 64, generator=gen) * 0.05 for n in (64, 16, 16)]
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.rand(64, generator=gen) + 0.5)
    linears = [nn.Linear(64, w.shape[0], bias=False) for w in fcs]
    for lin, w in zip(linears, fcs):
        lin.weight.data = w.clone()
    s = smoothing_factors(act, [lin.weight for lin in linears], alpha)
    ref_s, ref_ln, ref_fcs = literal_smooth_ln_fcs_llama_like(norm.weight.data, fcs, act, alpha)
    assert torch.equal(s, ref_s) and s[3] == 1e-5
    from quantlab.methods.awq_search import fold_scales

    fold_scales(norm, linears, s)
    assert torch.equal(norm.weight.data, ref_ln)
    for lin, ref in zip(linears, ref_fcs):
        assert torch.equal(lin.weight.data, ref)


def test_channel_absmax_is_the_reference_running_max():
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(2, 7, 24, generator=gen) * (i + 1) for i in range(3)]
    observer, ref = MinMaxObserver(per_channel=True), None
    for chunk in chunks:
        observer.update(chunk)
        ref = literal_stat_tensor(ref, chunk)
    assert torch.equal(channel_absmax(observer), ref)
    assert torch.equal(channel_absmax(observer), torch.cat(chunks).abs().reshape(-1, 24).amax(0))


def test_weight_grid_is_the_reference_per_channel_absmax():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 96, generator=gen) * 0.02
    w[5] = 0.0  # an all-zero row: the 1e-5 floor
    qweight = round_to_nearest(w, Grid(8, sym=True, zero_in_range=False), -1)
    assert torch.equal(qweight.dequantize(), literal_quantize_weight_per_channel_absmax(w))
    assert int(qweight.codes.min()) >= 1 and int(qweight.codes.max()) <= 255  # [-127, 127] around 128


# ---- on models ----------------------------------------------------------------------------


class SmoothOnly(SmoothQuant):
    """SmoothQuant's statistics and fold, no weight quantized: the model must not change."""

    quantizes_weights = False

    def __init__(self, config: SmoothQuantConfig) -> None:
        super().__init__(config)
        self.records: list[dict[str, dict]] = []

    def quantize_block(self, block) -> None:
        self.records.append(self.smooth_block(block)[0])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_smoothing_alone_leaves_the_logits_unchanged(fixture, request):
    loaded = request.getfixturevalue(fixture)
    model, arch = loaded.model, loaded.architecture
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(3)
    calib, probe = torch.randint(0, vocab, (4, 32), generator=gen), torch.randint(0, vocab, (2, 40), generator=gen)
    with torch.no_grad():
        before = model(probe).logits
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n and p.dim() == 1}
    method = SmoothOnly(SmoothQuantConfig())
    quantize_model(model, arch, method, calib, CPU, batch_size=2, progress=False)
    with torch.no_grad():
        after = model(probe).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    changed = max((p - norms[n]).abs().max().item() for n, p in model.named_parameters() if n in norms)
    assert changed > 1e-3, "the factors were folded somewhere (the test is not vacuous)"
    smoothed = {name for name, info in method.records[0].items() if "alpha" in info["smooth"]}
    if fixture == "tiny_opt":  # the reference's smooth_lm: qkv after the attention norm, fc1 after the final norm
        assert smoothed == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"}
    else:
        assert smoothed == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}


def test_block_statistics_are_the_full_precision_inputs_channel_max(tiny_llama):
    """Block 0's q_proj factor uses the max |x| over every calibration token of its input."""
    model, arch = tiny_llama.model, tiny_llama.architecture
    calib = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(4))
    seen = []
    q_proj = arch.block_list(model)[0].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(calib)
    handle.remove()
    act = torch.cat(seen).abs().reshape(-1, q_proj.in_features).amax(0)
    block0 = arch.block_list(model)[0]
    weights = [block0.self_attn.q_proj.weight, block0.self_attn.k_proj.weight, block0.self_attn.v_proj.weight]
    expected = smoothing_factors(act, weights, 0.5)
    method = SmoothOnly(SmoothQuantConfig())
    quantize_model(model, arch, method, calib, CPU, batch_size=2, progress=False)
    record = method.records[0]["self_attn.q_proj"]["smooth"]
    assert record["s_min"] == pytest.approx(float(expected.min()), rel=1e-5)
    assert record["s_max"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert record["act_absmax_max"] == pytest.approx(float(act.max()), rel=1e-6)


def test_full_run_commits_every_linear_at_8_bits_per_channel(tiny_llama):
    model, arch = tiny_llama.model, tiny_llama.architecture
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5))
    report = quantize_model(model, arch, SmoothQuant(SmoothQuantConfig()), calib, CPU, 2, progress=False)
    assert len(report.layers) == 2 * len(arch.linears)
    for layer in report.layers:
        in_features = dict(model.named_modules())[layer.name].in_features
        assert layer.bits == 8 and layer.bits_per_weight == pytest.approx(8 + 16 / in_features)
        assert layer.seconds == pytest.approx(sum(layer.info[f"{k}_seconds"] for k in ("stats", "smooth", "quant")))
        assert ("alpha" in layer.info["smooth"]) != layer.name.endswith(("o_proj", "down_proj"))
