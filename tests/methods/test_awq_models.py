"""AWQ on real model blocks: the scale transform is exact before quantization (tiny llama with GQA and
without, tiny OPT, SmolLM2), the chosen alpha is the grid minimum of the block-output loss
(brute force on a real SmolLM2 block), and a full run commits every linear with its record."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from quantlab.experiments.models.adapters import architecture_for
from quantlab.experiments.run.pipeline import DecoderBlockView, capture_block_inputs, quantize_model
from quantlab.methods import awq_search
from quantlab.methods.awq import AWQ, AWQConfig

CPU = torch.device("cpu")


class ScaleOnly(AWQ):
    """AWQ's statistics, scale search and fold, with no weight quantized: the model must not change."""

    quantizes_weights = False

    def __init__(self, config: AWQConfig) -> None:
        super().__init__(config)
        self.states = []

    def quantize_block(self, block) -> None:
        self.states.append(self.scale_block(block))


def _mha_llama():
    config = AutoConfig.for_model(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), architecture_for("llama")


def _random_scales(monkeypatch):
    """Replace the search by wide random scales (e^N(0,1)), to stress the fold far from s = 1."""
    gen = torch.Generator().manual_seed(0)

    def fake(module, calls, linears, x_mean, *args, **kwargs):
        s = torch.exp(torch.randn(x_mean.numel(), generator=gen))
        return awq_search.ScaleSearch(0.5, 0.0, s, [0.0])

    monkeypatch.setattr(awq_search, "search_group_scales", fake)


def _assert_scaling_is_exact(model, arch, vocab: int, method: ScaleOnly, atol: float = 1e-4) -> None:
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, vocab, (4, 32), generator=gen)
    probe = torch.randint(0, vocab, (2, 40), generator=gen)
    with torch.no_grad():
        before = model(probe).logits
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n and p.dim() == 1}
    quantize_model(model, arch, method, calib, CPU, batch_size=2, progress=False)
    with torch.no_grad():
        after = model(probe).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=atol)
    changed = max((p - norms[n]).abs().max().item() for n, p in model.named_parameters() if n in norms)
    assert changed > 1e-3, "the scales were folded somewhere (the test is not vacuous)"


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
@pytest.mark.parametrize("scales", ["searched", "random"])
def test_scaling_alone_leaves_the_logits_unchanged(fixture, scales, request, monkeypatch):
    loaded = request.getfixturevalue(fixture)
    if scales == "random":
        _random_scales(monkeypatch)
    method = ScaleOnly(AWQConfig(bits=2, group_size=16, duo_scaling=fixture == "tiny_opt"))
    _assert_scaling_is_exact(loaded.model, loaded.architecture, loaded.model.config.vocab_size, method)
    state = method.states[0]
    applied = {name for name, info in state.info.items() if "alpha" in info["scale"]}
    if fixture == "tiny_opt":  # OPT: every linear is in a group, fc1 -> fc2 included
        assert applied == set(loaded.architecture.linears)
    else:  # tiny llama has 4 heads / 2 kv heads: v_proj -> o_proj is skipped, as llm-awq
        assert applied == set(loaded.architecture.linears) - {"self_attn.o_proj"}
        assert "grouped-query attention" in state.info["self_attn.o_proj"]["scale"]["skipped"]


def test_scaling_alone_is_exact_without_gqa_where_v_to_o_is_folded(monkeypatch):
    model, arch = _mha_llama()
    _random_scales(monkeypatch)
    method = ScaleOnly(AWQConfig(bits=3, group_size=32))
    _assert_scaling_is_exact(model, arch, 512, method)
    assert method.states[0].info["self_attn.o_proj"]["scale"]["prev_op"] == "self_attn.v_proj"
    assert "alpha" in method.states[0].info["self_attn.o_proj"]["scale"]


def test_full_run_commits_every_linear_with_its_choices(tiny_llama):
    torch.manual_seed(0)
    calib = torch.randint(0, tiny_llama.model.config.vocab_size, (4, 48))
    method = AWQ(AWQConfig(bits=3, group_size=32))
    assert method.propagation == "float" and method.needs_calibration
    report = quantize_model(tiny_llama.model, tiny_llama.architecture, method, calib, CPU, 2, progress=False)
    assert len(report.layers) == 2 * 7
    for layer in report.layers:
        info = layer.info
        assert layer.bits == 3 and layer.bits_per_weight == pytest.approx(3 + (16 + 3) / 32)
        assert {"stats_seconds", "scale_seconds", "clip_seconds", "quant_seconds"} <= set(info)
        assert layer.seconds == pytest.approx(
            sum(info[f"{k}_seconds"] for k in ("stats", "scale", "clip", "quant"))
        )
        if "alpha" in info["scale"]:
            assert info["scale"]["loss"] == min(info["scale"]["losses"]) <= info["scale"]["loss_alpha0"]
            assert len(info["scale"]["losses"]) == 20
        if layer.name.endswith(("q_proj", "k_proj")):
            assert "never clipped" in info["clip"]["skipped"]
        else:
            assert info["clip"]["err"] <= info["clip"]["err_unclipped"]
            assert info["clip"]["tokens"] == 4 * 48  # fewer than 512 tokens: all of them


def _fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """llm-awq's group quantizer written out per column range (vectorised over rows)."""
    maxq, out = 2**bits - 1, torch.empty_like(w)
    for start in range(0, w.shape[1], group_size):
        g = w[:, start : start + group_size]
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        step = (hi - lo).clamp(min=1e-5) / maxq
        zero = torch.clamp(-torch.round(lo / step), 0, maxq)
        out[:, start : start + group_size] = (
            torch.clamp(torch.round(g / step) + zero, 0, maxq) - zero
        ) * step
    return out


@pytest.mark.slow
def test_scaling_alone_is_exact_on_smollm2(fresh_smollm2):
    """Real weights and activations, on the first 4 of 30 blocks (the CPU cost of all 30 is minutes;
    the transform is per block), with a 5-point alpha grid: the scales only have to be real."""
    model = fresh_smollm2.model
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    method = ScaleOnly(AWQConfig(bits=3, group_size=128, n_grid=5))
    _assert_scaling_is_exact(model, fresh_smollm2.architecture, 49152, method, atol=1e-3)
    s_max = max(
        info["scale"]["s_max"] for st in method.states for info in st.info.values() if "s_max" in info["scale"]
    )
    assert s_max > 2, "real activations give scales far from 1"


@pytest.mark.slow
def test_chosen_alpha_minimises_the_block_loss_on_a_real_block(fresh_smollm2):
    """Brute force on SmolLM2 block 2 (3 bits, g128: 576 = 4 x 128 + 64): for every alpha, rebuild
    the scaled fake-quant weights with the formulas written out, run the attention (with freshly
    computed rotary embeddings) or the MLP or down_proj directly, and compare with the search."""
    model, arch = fresh_smollm2.model, fresh_smollm2.architecture
    torch.manual_seed(0)
    calib = torch.randint(0, 49152, (2, 64))
    inputs = capture_block_inputs(model, arch, calib, CPU, batch_size=2)
    index = 2
    for i in range(index):  # full-precision propagation to block 2
        DecoderBlockView(i, f"b{i}", arch.block_list(model)[i], arch, inputs).advance_in_place()
    block = arch.block_list(model)[index]
    view = DecoderBlockView(index, f"b{index}", block, arch, inputs)
    seen = {name: [] for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")}
    view.run({name: seen[name].append for name in seen})
    x = {name: torch.cat(chunks) for name, chunks in seen.items()}
    positions = torch.arange(64)[None].expand(2, 64)
    rotary = model.model.rotary_emb(x["self_attn.q_proj"], positions)
    groups = {
        "self_attn.q_proj": (
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            lambda: block.self_attn(
                hidden_states=x["self_attn.q_proj"], position_embeddings=rotary, attention_mask=None
            )[0],
        ),
        "mlp.gate_proj": (["mlp.gate_proj", "mlp.up_proj"], lambda: block.mlp(x["mlp.gate_proj"])),
        "mlp.down_proj": (["mlp.down_proj"], lambda: block.mlp.down_proj(x["mlp.down_proj"])),
    }
    brute = {}
    with torch.no_grad():
        for first, (names, run) in groups.items():
            linears = [block.get_submodule(n) for n in names]
            originals = [lin.weight.data.clone() for lin in linears]
            target = run()
            x_mean = x[first].reshape(-1, x[first].shape[-1]).abs().mean(dim=0)
            losses = []
            for r in range(20):
                s = x_mean.pow(r / 20).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for lin, w in zip(linears, originals):
                    lin.weight.data = _fake_quant(w * s, 3, 128) / s
                losses.append(float((target - run()).pow(2).mean()))
                for lin, w in zip(linears, originals):
                    lin.weight.data = w.clone()
            brute[first] = losses
    state = AWQ(AWQConfig(bits=3, group_size=128)).scale_block(view)
    for first, losses in brute.items():
        found = state.info[first]["scale"]
        torch.testing.assert_close(torch.tensor(found["losses"]), torch.tensor(losses), rtol=2e-3, atol=0)
        chosen = losses[round(found["alpha"] * 20)]
        assert chosen <= min(losses) * (1 + 1e-3), f"{first}: alpha {found['alpha']} is not the grid minimum"
        assert found["loss"] < found["loss_alpha0"], f"{first}: scaling should beat plain RTN on a real block"
