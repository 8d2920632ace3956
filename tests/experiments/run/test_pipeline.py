import pytest
import torch

from quantlab.experiments.run.pipeline import DecoderBlockView, capture_block_inputs, quantize_model
from quantlab.methods.fp16 import FP16Config, FullPrecision
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import RTN, RTNConfig, round_to_nearest


def calib(n=6, seqlen=32, seed=0):
    return torch.randint(0, 49152, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_fp16_method_through_the_driver_leaves_outputs_bit_identical(fixture, request):
    loaded = request.getfixturevalue(fixture)
    ids = calib()
    before = logits(loaded.model, ids)
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    # FP16 does not need calibration, so force the full capture/propagate path with a subclass
    method = type("Probe", (FullPrecision,), {"needs_calibration": True})(FP16Config())
    report = quantize_model(loaded.model, loaded.architecture, method, ids, torch.device("cpu"), batch_size=4)
    assert report.layers == []
    assert all(torch.equal(weights[k], v) for k, v in loaded.model.state_dict().items())
    assert torch.equal(before, logits(loaded.model, ids))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_captured_inputs_propagate_to_the_true_next_block_inputs(fixture, request):
    """Block outputs recomputed by the driver equal the hidden states of a full forward pass."""
    loaded = request.getfixturevalue(fixture)
    ids = calib(n=4)
    inputs = capture_block_inputs(loaded.model, loaded.architecture, ids, torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        states = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(torch.cat(inputs.hidden), states[0], atol=1e-6)
    view = DecoderBlockView(0, "b0", loaded.architecture.block_list(loaded.model)[0], loaded.architecture, inputs)
    view.advance_in_place()
    assert torch.allclose(torch.cat(inputs.hidden), states[1], atol=1e-5)


def test_rtn_through_the_driver_equals_rtn_on_each_weight(tiny_llama):
    originals = {n: m.weight.detach().clone() for n, m in tiny_llama.model.named_modules() if hasattr(m, "weight") and m.weight.ndim == 2}
    config = RTNConfig(bits=3, group_size=32)
    report = quantize_model(tiny_llama.model, tiny_llama.architecture, RTN(config), None, torch.device("cpu"))
    assert len(report.layers) == 2 * 7
    for record in report.layers:
        module = tiny_llama.model.get_submodule(record.name)
        expected = round_to_nearest(originals[record.name], config.grid(), 32).dequantize()
        assert torch.equal(module.weight, expected)
        assert 0 < record.rel_weight_error < 1
    # embeddings and lm_head stay in full precision, as in every reference
    assert torch.equal(tiny_llama.model.get_input_embeddings().weight, originals["model.embed_tokens"])


def test_run_with_hooks_and_early_stop(tiny_llama):
    ids = calib(n=4, seqlen=16)
    inputs = capture_block_inputs(tiny_llama.model, tiny_llama.architecture, ids, torch.device("cpu"), batch_size=2)
    block = tiny_llama.architecture.block_list(tiny_llama.model)[0]
    view = DecoderBlockView(0, "b0", block, tiny_llama.architecture, inputs)
    seen: dict[str, int] = {}

    def counter(name):
        return lambda x: seen.__setitem__(name, seen.get(name, 0) + x.shape[0] * x.shape[1])

    mlp_calls = []
    handle = block.mlp.register_forward_pre_hook(lambda *a: mlp_calls.append(1))
    view.run({"self_attn.q_proj": counter("q"), "self_attn.v_proj": counter("v")}, stop_after="self_attn.v_proj")
    handle.remove()
    assert seen == {"q": 4 * 16, "v": 4 * 16}
    assert mlp_calls == [], "stop_after must end the forward before the MLP"
    view.run({"mlp.down_proj": counter("down")})
    assert seen["down"] == 4 * 16


def test_method_that_skips_a_linear_is_caught(tiny_llama):
    class Lazy(RTN):
        def quantize_block(self, block):
            name, linear = next(iter(block.linears.items()))
            block.commit(name, round_to_nearest(linear.weight, Grid(4), 32), seconds=0.0)

    with pytest.raises(RuntimeError, match="unquantized"):
        quantize_model(tiny_llama.model, tiny_llama.architecture, Lazy(RTNConfig()), None, torch.device("cpu"))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_linears_of_a_scaling_group_receive_the_identical_input(fixture, request):
    """What the adapter tables declare, and GPTQ's shared Hessians rely on."""
    loaded = request.getfixturevalue(fixture)
    ids = calib(n=2, seqlen=16)
    inputs = capture_block_inputs(loaded.model, loaded.architecture, ids, torch.device("cpu"), batch_size=2)
    block = loaded.architecture.block_list(loaded.model)[0]
    view = DecoderBlockView(0, "b0", block, loaded.architecture, inputs)
    seen: dict[str, torch.Tensor] = {}
    view.run({name: (lambda n: lambda x: seen.__setitem__(n, x))(name) for name in view.linears})
    for group in loaded.architecture.scaling_groups:
        if group.prev_op in view.linears:
            continue  # linear -> linear groups (v -> o) are about scaling, not input sharing
        first = seen[group.linears[0]]
        assert all(seen[name] is first for name in group.linears), group


def test_gptq_shares_one_hessian_per_distinct_input_and_counts_sequences(tiny_llama):
    from quantlab.methods.gptq import GPTQ, GPTQConfig

    ids = calib(n=6, seqlen=32)
    report = quantize_model(
        tiny_llama.model, tiny_llama.architecture, GPTQ(GPTQConfig(bits=4, group_size=32)), ids,
        torch.device("cpu"), batch_size=4,
    )
    info = {r.name.split(".", 3)[-1]: r.info for r in report.layers if r.name.startswith("model.layers.0.")}
    # q runs first in the attention, gate first in the MLP: their inputs build the shared Hessians
    assert {info[n]["hessian_from"] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")} == {"self_attn.q_proj"}
    assert info["mlp.gate_proj"]["hessian_from"] == info["mlp.up_proj"]["hessian_from"] == "mlp.gate_proj"
    assert info["self_attn.o_proj"]["hessian_from"] == "self_attn.o_proj"
    # N counts sequences (6, in chunks of 4 + 2), not tokens or chunks
    assert all(r.info["hessian_sequences"] == 6 for r in report.layers)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_last_pass_keeps_the_residual_and_outputs_are_unchanged(fixture, request):
    """The output pass from the kept mid-block residual equals the full block forward."""
    loaded = request.getfixturevalue(fixture)
    ids = calib(n=4, seqlen=16)
    arch = loaded.architecture
    block = arch.block_list(loaded.model)[0]
    full = capture_block_inputs(loaded.model, arch, ids, torch.device("cpu"), batch_size=2)
    short = capture_block_inputs(loaded.model, arch, ids, torch.device("cpu"), batch_size=2)
    DecoderBlockView(0, "b0", block, arch, full).advance_in_place()
    view = DecoderBlockView(0, "b0", block, arch, short)
    view.run(stop_after=arch.linears[-1], last_pass=True)
    assert view.consumed
    with pytest.raises(RuntimeError, match="last_pass"):
        view.run()
    view.advance_in_place()
    for a, b in zip(full.hidden, short.hidden):
        assert torch.allclose(a, b, atol=1e-6)


def test_last_pass_that_stops_before_the_checkpoint_keeps_the_inputs(tiny_llama):
    ids = calib(n=2, seqlen=16)
    arch = tiny_llama.architecture
    inputs = capture_block_inputs(tiny_llama.model, arch, ids, torch.device("cpu"), batch_size=2)
    before = [h.clone() for h in inputs.hidden]
    view = DecoderBlockView(0, "b0", arch.block_list(tiny_llama.model)[0], arch, inputs)
    view.run(stop_after="self_attn.q_proj", last_pass=True)
    assert not view.consumed and all(torch.equal(a, b) for a, b in zip(before, inputs.hidden))


def test_gptq_through_the_driver_is_bit_identical_across_runs(request):
    from quantlab.methods.gptq import GPTQ, GPTQConfig

    weights = []
    for _ in range(2):
        loaded = request.getfixturevalue("tiny_llama") if not weights else _fresh_tiny_llama()
        quantize_model(
            loaded.model, loaded.architecture, GPTQ(GPTQConfig(bits=3, group_size=32, act_order=True)), calib(n=6),
            torch.device("cpu"), batch_size=4,
        )
        weights.append({k: v.clone() for k, v in loaded.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _fresh_tiny_llama():
    from tests.conftest import _load

    return _load("tiny-llama")


def test_a_group_wider_than_the_layer_is_recorded_as_per_channel(tiny_llama, caplog):
    """group_size=128 on 64-wide linears silently became per channel, recorded as 128."""
    report = quantize_model(
        tiny_llama.model, tiny_llama.architecture, RTN(RTNConfig(bits=4, group_size=128)), None,
        torch.device("cpu"), progress=False,
    )
    layers = {r.name.split(".")[-1]: r.as_dict() for r in report.layers}
    assert layers["q_proj"]["group_size"] == 128 and layers["q_proj"]["group_size_effective"] == -1
    assert "group_size_effective" not in layers["down_proj"]  # 160 wide: groups of 128 and 32
    assert "group_size=128 is wider than 12 linears (input widths [64])" in caplog.text
