"""Adapters for families without a table, derived from the model's structure (adapters.py
`derive_architecture`), on tiny random models built here from transformers' config classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

from quantlab.experiments.evaluation.perplexity import perplexity, window_nll
from quantlab.experiments.models.adapters import (
    LLAMA_LIKE,
    OPT,
    UnsupportedArchitecture,
    check_model_type,
    check_structure,
    derive_architecture,
    resolve_architecture,
)
from quantlab.experiments.models.loading import ModelSpec, load_model
from quantlab.experiments.run.pipeline import DecoderBlockView, capture_block_inputs, quantize_model
from quantlab.methods.awq import AWQ, AWQConfig
from quantlab.methods.gptq import GPTQ, GPTQConfig
from quantlab.methods.rtn import RTN, RTNConfig

VOCAB, SEQLEN = 128, 32
CONFIGS = {
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
    "phi3": transformers.Phi3Config,
    "gemma2": transformers.Gemma2Config,
    "qwen3": transformers.Qwen3Config,
}
TABLED = {"qwen2", "mistral", "qwen3"}  # LLAMA_LIKE claims these; phi3 and gemma2 are derived
CPU = torch.device("cpu")


def tiny(model_type: str, **overrides) -> torch.nn.Module:
    shape = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type](**{**shape, **overrides}))
    return model.eval().requires_grad_(False)


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_model_type_resolves_to_its_table_or_a_derived_adapter(model_type):
    model = tiny(model_type)
    arch = resolve_architecture(model)
    check_model_type(model_type)  # the pre-load check (random configs) takes it too
    if model_type in TABLED:
        assert arch is LLAMA_LIKE
        return
    assert arch.derived and arch.family == model_type and arch.scaling_groups == ()
    block = arch.block_list(model)[0]
    every_linear = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(arch.linears) == every_linear
    assert sorted(n for group in arch.sequential_groups for n in group) == sorted(arch.linears)


def test_fused_and_extra_norm_layouts_are_found_in_execution_order():
    phi3 = derive_architecture(tiny("phi3"))
    # Phi-3 registers o_proj before qkv_proj: the order comes from the forward, not the registration
    assert phi3.linears == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    assert phi3.input_groups == ()  # fused: no two linears read one tensor
    gemma2 = derive_architecture(tiny("gemma2"))
    assert gemma2.input_groups == (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    assert gemma2.pre_block_modules == ("model.embed_tokens", "model.rotary_emb")
    assert gemma2.finish_logits is not None  # final_logit_softcapping


@pytest.mark.parametrize("build, table", [
    (lambda: tiny("qwen2"), LLAMA_LIKE),
    (lambda: AutoModelForCausalLM.from_config(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, pad_token_id=0)).eval(), OPT),
])
def test_derived_adapter_agrees_with_the_hand_written_tables(build, table):
    derived = derive_architecture(build())
    assert (derived.backbone, derived.blocks) == (table.backbone, table.blocks)
    assert set(derived.linears) == set(table.linears)
    assert set(derived.pre_block_modules) <= set(table.pre_block_modules)  # OPT's project_in is None here
    # every input group the forward found is a table's scaling group after a norm (same input by design)
    norm_groups = {tuple(sorted(g.linears)) for g in table.scaling_groups if g.prev_op not in table.linears}
    assert {tuple(sorted(g)) for g in derived.input_groups} <= norm_groups


@pytest.mark.parametrize("model_type", ["phi3", "gemma2"])
def test_perplexity_of_a_derived_model_is_the_models_own(model_type):
    """window_nll runs backbone + lm_head (+ the head's extra step): equal to the model's logits."""
    model = tiny(model_type)
    arch = derive_architecture(model)
    windows = ids(2, seed=1)
    logits = model(input_ids=windows).logits[:, :-1].float()
    own = F.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1), reduction="none").view(2, -1).mean(1)
    torch.testing.assert_close(window_nll(model, arch, windows), own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["phi3", "gemma2"])
def test_driver_propagates_block_inputs_of_a_derived_model(model_type):
    model = tiny(model_type)
    arch = derive_architecture(model)
    calib = ids(4, seed=2)
    inputs = capture_block_inputs(model, arch, calib, CPU, batch_size=2)
    states = model(input_ids=calib, output_hidden_states=True).hidden_states
    torch.testing.assert_close(torch.cat(inputs.hidden), states[0])
    DecoderBlockView(0, "b0", arch.block_list(model)[0], arch, inputs).advance_in_place()
    torch.testing.assert_close(torch.cat(inputs.hidden), states[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("method", [RTN(RTNConfig(bits=4, group_size=32)), GPTQ(GPTQConfig(bits=4, group_size=32))],
                         ids=["rtn", "gptq"])
def test_rtn_and_gptq_quantize_every_family(model_type, method):
    model = tiny(model_type)
    arch = resolve_architecture(model)
    windows = ids(3, seed=3)
    before = perplexity(model, arch, windows).value
    report = quantize_model(model, arch, method, ids(4, seed=4), CPU, batch_size=2, progress=False)
    assert len(report.layers) == 2 * len(arch.linears)
    assert {r.name for r in report.layers} == {
        f"{arch.blocks}.{i}.{n}" for i in range(2) for n in arch.linears}
    assert report.avg_bits is not None and 4 < report.avg_bits < 5
    after = perplexity(model, arch, windows).value
    assert torch.isfinite(torch.tensor(after)) and after != before
    if method.name == "gptq" and arch.input_groups:  # one Hessian per shared input, true-sequential
        hessian_from = {r.name.rsplit(".", 2)[-2] + "." + r.name.rsplit(".", 1)[-1]: r.info["hessian_from"]
                        for r in report.layers[: len(arch.linears)]}
        assert hessian_from["self_attn.k_proj"] == hessian_from["self_attn.v_proj"] == "self_attn.q_proj"


@pytest.mark.parametrize("model_type", ["phi3", "gemma2"])
def test_awq_refuses_a_derived_adapter_naming_the_family_and_the_fix(model_type):
    model = tiny(model_type)
    with pytest.raises(UnsupportedArchitecture, match=rf"'awq'.*model_type '{model_type}' has no table.*"
                       r"experiments/models/adapters\.py.*rtn"):
        quantize_model(model, resolve_architecture(model), AWQ(AWQConfig(bits=4, group_size=32)), ids(2, 5), CPU)


def test_awq_still_runs_where_a_table_has_scaling_groups():
    model = tiny("qwen3")
    report = quantize_model(model, resolve_architecture(model), AWQ(AWQConfig(bits=4, group_size=32, n_grid=4)),
                            ids(2, 6), CPU, progress=False)
    assert any("scale" in r.info for r in report.layers)


def test_block_zero_mask_is_refused_where_layers_attend_differently_beyond_the_window():
    model = tiny("gemma2", sliding_window=16)  # layer 0 sliding, layer 1 full
    with pytest.raises(ValueError, match=r"sliding_attention.*window 16.*32 tokens.*calib\.seqlen <= 16"):
        capture_block_inputs(model, resolve_architecture(model), ids(2, 7), CPU, batch_size=2)
    capture_block_inputs(model, resolve_architecture(model), ids(2, 7)[:, :16], CPU, batch_size=2)


def test_gpt2_conv1d_blocks_are_refused_clearly_before_and_after_loading():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    message = r"'gpt2': GPT2Block holds no nn\.Linear.*Conv1D"
    with pytest.raises(UnsupportedArchitecture, match=message):
        check_structure(config)  # on the meta device
    with pytest.raises(UnsupportedArchitecture, match=message):
        resolve_architecture(AutoModelForCausalLM.from_config(config))
    for model_type in CONFIGS:  # the layouts the derived adapter reads pass
        check_structure(tiny(model_type).config)


def test_unknown_model_type_is_refused_before_loading():
    with pytest.raises(UnsupportedArchitecture, match=r"'t5' has no causal LM class.*tables: .*llama"):
        check_model_type("t5")


@pytest.mark.parametrize("model_type", ["phi3", "gemma2"])
def test_a_local_folder_of_a_derived_family_loads(model_type, tmp_path, tiny_llama):
    model = tiny(model_type)
    model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)  # any tokenizer: the folder needs one
    loaded = load_model(ModelSpec(name=model_type, source="local", path=str(tmp_path), dtype="float32", device="cpu"))
    assert loaded.architecture.derived and loaded.architecture.family == model_type
    windows = ids(2, seed=8)
    # the same weights (attention may load as sdpa, not eager: equal to rounding)
    torch.testing.assert_close(loaded.model(input_ids=windows).logits, model(input_ids=windows).logits)
