"""Activation quantization through the driver and the CLI on tiny llama (experiments/run/activations.py):
static ranges are the observers' statistics of the quantized model's linear inputs, observing leaves
the weights alone, the evaluated model carries the input fake-quant (not the baseline, not skipped
linears), and fp16 + act evaluates the act-quantized model."""

from __future__ import annotations

import json

import pytest
import torch

from quantlab.experiments.run import activations
from quantlab.experiments.run.activations import StaticCalibration
from quantlab.experiments.run.module_rules import parse_rules
from quantlab.experiments.run.pipeline import quantize_model
from quantlab.experiments.run.schema import ActConfig, ObserverConfig
from quantlab.kernels.activations import INPUT_QUANTIZER
from quantlab.methods.gptq import GPTQ, GPTQConfig
from quantlab.methods.rtn import RTN, RTNConfig
from quantlab.methods.slim_llm import SliMLLM, SliMLLMConfig
from quantlab.methods.vptq import VPTQ, VPTQConfig
from tests.conftest import _load, run_quantlab
from tests.experiments.store.test_shared_inputs import private_cache

CPU = torch.device("cpu")
STATIC = ActConfig(bits=8, granularity="per_tensor", sym=True, mode="static")


def _calib(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))


def _linear_input_ranges(model, arch, ids, batch_size):
    """min / max of every decoder linear's input over a plain forward of the (quantized) model."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(arch.block_list(model)):
        for name, linear in arch.block_linears(block).items():
            key = f"{arch.blocks}.{index}.{name}"
            handles.append(linear.register_forward_pre_hook(
                lambda _m, args, _k=key: seen.setdefault(_k, []).append(torch.stack(torch.aminmax(args[0].float())))))
    with torch.no_grad():
        for chunk in ids.split(batch_size):
            model(input_ids=chunk, use_cache=False)
    for handle in handles:
        handle.remove()
    return {k: (float(torch.stack(v)[:, 0].min()), float(torch.stack(v)[:, 1].max())) for k, v in seen.items()}


def test_static_ranges_are_the_min_max_of_the_quantized_models_linear_inputs():
    loaded = _load("tiny-llama")
    model, arch = loaded.model, loaded.architecture
    calib = _calib(model.config.vocab_size)
    report = quantize_model(model, arch, RTN(RTNConfig(bits=4, group_size=32)), calib, CPU, 2, progress=False,
                            activations=StaticCalibration(STATIC, ObserverConfig("min_max")))
    expected = _linear_input_ranges(model, arch, calib, 2)  # RTN: data-free, quantized propagation
    assert set(report.act_ranges) == set(expected)
    for name, (lo, hi) in expected.items():
        entry = report.act_ranges[name]
        assert entry["lo"] == pytest.approx(lo, rel=1e-5, abs=1e-6) and entry["hi"] == pytest.approx(hi, rel=1e-5, abs=1e-6)
        assert entry["scale"] == pytest.approx(max(-entry["lo"], entry["hi"]) / 127) and entry["zero"] == 128
        assert entry["clipped_fraction"] == 0.0 and entry["observer_seconds"] >= 0
    q, k = report.act_ranges["model.layers.0.self_attn.q_proj"], report.act_ranges["model.layers.0.self_attn.k_proj"]
    assert q == k and q["input_of"] == "model.layers.0.self_attn.q_proj"  # one observer per distinct input
    assert report.seconds["observer_s"] > 0


def _attention_calls(model, arch) -> list[int]:
    """A counter of every block's attention calls (each one a block forward that got past it)."""
    counts = [0]
    for block in arch.block_list(model):
        block.self_attn.register_forward_pre_hook(lambda *_: counts.__setitem__(0, counts[0] + 1))
    return counts


@pytest.mark.parametrize("method, rule_items", [
    (GPTQ(GPTQConfig(bits=3, group_size=32)), None),                               # true-sequential
    (GPTQ(GPTQConfig(bits=3, group_size=32, true_sequential=False)), None),        # one pass for all
    (GPTQ(GPTQConfig(bits=3, group_size=32)), [{"match": "o_proj", "skip": True}, {"match": "mlp", "bits": 4}]),
    (SliMLLM(SliMLLMConfig(bits=2, group_size=32)), None),                         # one-pass statistics
    (VPTQ(VPTQConfig(vector_len=4, centroids=16, residual_centroids=0, kmeans_iters=2)), None),       # float propagation
], ids=["gptq", "gptq-one-pass", "gptq-rules", "slim_llm", "vptq"])
def test_observers_riding_on_the_methods_passes_see_the_quantized_models_inputs(method, rule_items):
    """Where GPTQ's passes carry the observers, every range is still the min / max of the quantized
    model's linear inputs (quantized propagation: a plain forward of the result; float: each block
    on full-precision inputs), and inputs that no pass reached final fall back to the output pass."""
    loaded, plain = _load("tiny-llama"), _load("tiny-llama")
    model, arch = loaded.model, loaded.architecture
    calib = _calib(model.config.vocab_size)
    rules = parse_rules(rule_items, method.name, method.config) if rule_items else None
    report = quantize_model(model, arch, method, calib, CPU, 2, progress=False, rules=rules,
                            activations=StaticCalibration(STATIC, ObserverConfig("min_max")))
    if method.propagation == "quantized":
        expected = _linear_input_ranges(model, arch, calib, 2)
    else:  # each quantized block on the full-precision model's block inputs
        expected = _float_propagation_ranges(plain.model, model, arch, calib, 2)
    skipped = {f"model.layers.{i}.self_attn.o_proj" for i in range(2)} if rule_items else set()
    assert set(report.act_ranges) == set(expected) - skipped
    for name, entry in report.act_ranges.items():
        lo, hi = expected[name]
        assert entry["lo"] == pytest.approx(lo, rel=1e-5, abs=1e-6) and entry["hi"] == pytest.approx(hi, rel=1e-5, abs=1e-6), name
    seen_on = {name.split(".", 3)[-1]: entry["observed_on"] for name, entry in report.act_ranges.items()
               if name.startswith("model.layers.0.")}
    if method.name == "gptq" and method.config.true_sequential is not False:
        assert set(seen_on.values()) == {"method_pass"}  # q/k/v on pass 1, o on 2, gate/up on 3, down on 4
    else:  # one pass before any commit: only q/k/v's input (nothing runs before it) was final on it
        fallback = "output_pass" if method.propagation == "quantized" else "extra_forward"
        assert seen_on["self_attn.q_proj"] == "method_pass"
        assert {v for k, v in seen_on.items() if not k.startswith("self_attn.") or k == "self_attn.o_proj"} == {fallback}


def _float_propagation_ranges(fp_model, quantized, arch, ids, batch_size):
    """min / max of each quantized block's linear inputs when it runs on the full-precision model's
    block inputs (float propagation), via hooks moved block by block."""
    fp_blocks, q_blocks = arch.block_list(fp_model), arch.block_list(quantized)
    def shadow(q_block):
        def hook(_module, args, kwargs, _output) -> None:  # returns None: the fp output goes on
            q_block(*args, **kwargs)
        return hook

    for fp_block, q_block in zip(fp_blocks, q_blocks):
        fp_block.register_forward_hook(shadow(q_block), with_kwargs=True)
    seen: dict[str, list[torch.Tensor]] = {}
    for index, block in enumerate(q_blocks):
        for name, linear in arch.block_linears(block).items():
            key = f"{arch.blocks}.{index}.{name}"
            linear.register_forward_pre_hook(
                lambda _m, args, _k=key: seen.setdefault(_k, []).append(torch.stack(torch.aminmax(args[0].float()))))
    with torch.no_grad():
        for chunk in ids.split(batch_size):
            fp_model(input_ids=chunk, use_cache=False)
    return {k: (float(torch.stack(v)[:, 0].min()), float(torch.stack(v)[:, 1].max())) for k, v in seen.items()}


def test_riding_observers_add_no_block_forward_to_gptq():
    """With true-sequential GPTQ every input is observed on GPTQ's own passes: the block forwards
    (attention calls) are those of a weight-only run, and the output pass keeps its shortcut."""
    calls = {}
    for observed in (False, True):
        loaded = _load("tiny-llama")
        counter = _attention_calls(loaded.model, loaded.architecture)
        calib = _calib(loaded.model.config.vocab_size)
        quantize_model(loaded.model, loaded.architecture, GPTQ(GPTQConfig(bits=4, group_size=32)), calib, CPU, 2,
                       progress=False, activations=StaticCalibration(STATIC, ObserverConfig("mse")) if observed else None)
        calls[observed] = counter[0]
    assert calls[True] == calls[False] > 0


def test_observing_leaves_the_weights_as_a_plain_run_makes_them():
    """GPTQ's last pass hands the propagation mid-block residuals; observers need the whole block,
    which must change nothing but time."""
    plain, observed = _load("tiny-llama"), _load("tiny-llama")
    calib = _calib(plain.model.config.vocab_size)
    config = GPTQConfig(bits=3, group_size=32)
    quantize_model(plain.model, plain.architecture, GPTQ(config), calib, CPU, 2, progress=False)
    report = quantize_model(observed.model, observed.architecture, GPTQ(config), calib, CPU, 2, progress=False,
                            activations=StaticCalibration(STATIC, ObserverConfig("percentile", percentile=99.9)))
    for (name, a), (_, b) in zip(plain.model.named_parameters(), observed.model.named_parameters()):
        assert torch.equal(a, b), name
    clipped = [r["clipped_fraction"] for r in report.act_ranges.values()]
    assert all(0 < c < 0.01 for c in clipped)


def test_attached_quantizers_change_the_output_and_skip_skipped_linears():
    loaded = _load("tiny-llama")
    model, arch = loaded.model, loaded.architecture
    ids = _calib(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    skipped = {"model.layers.0.mlp.down_proj": (0, 0)}
    count = activations.attach(model, arch, ActConfig(bits=8), skipped, {})
    assert count == {"fake_quant": 13, "int8_int_mm": 0} and not hasattr(model.get_submodule("model.layers.0.mlp.down_proj"), INPUT_QUANTIZER)
    with torch.no_grad():
        eight = model(input_ids=ids).logits
    other = _load("tiny-llama")
    activations.attach(other.model, other.architecture, ActConfig(bits=4), {}, {})
    with torch.no_grad():
        four = other.model(input_ids=ids).logits
    assert 0 < (eight - before).abs().max() < (four - before).abs().max()
    assert sum(activations.attach(model, arch, ActConfig(), {}, {}).values()) == 0  # bits 16: nothing attached


def _overrides(tmp_path, name, *extra: str) -> list[str]:
    return [
        "model=tiny-llama", "calib=pydocs", "calib.nsamples=4", "calib.seqlen=64", "eval.ppl.datasets=[pydocs]",
        "eval.ppl.seqlen=64", "eval.ppl.max_windows=2", f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / name}", *extra,
    ]


def _ppl(tmp_path, name, data_dir, *extra):
    proc = run_quantlab(*_overrides(tmp_path, name, *extra), QUANTLAB_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / name / "result.json").read_text())
    return record, record["metrics"]["ppl"]["pydocs"]["value"], record["baseline"]["ppl"]["pydocs"]["value"]


def test_cli_act_runs_evaluate_the_act_quantized_model(tmp_path, data_dir):
    private_cache(tmp_path)
    off, ppl_off, base = _ppl(tmp_path, "off", data_dir, "method=rtn", "bits=8", "group_size=-1", "method.sym=true")
    eight, ppl_8, base_8 = _ppl(tmp_path, "a8", data_dir, "method=rtn", "bits=8", "group_size=-1", "method.sym=true",
                                "act=int8_per_token")
    four, ppl_4, _ = _ppl(tmp_path, "a4", data_dir, "method=rtn", "bits=8", "group_size=-1", "method.sym=true",
                          "act=int4_per_token")
    assert base_8 == base  # the baseline stays full precision
    assert ppl_8 != ppl_off and abs(ppl_8 - ppl_off) < abs(ppl_4 - ppl_off)
    assert (off["act_bits"], eight["act_bits"], four["act_bits"]) == (16, 8, 4)
    assert eight["act"]["quantized_linears"] == 14 and eight["avg_bits"] == off["avg_bits"]
    assert off["config_hash"] != eight["config_hash"]
    # fp16 + static act: the quantized entry is the act-quantized full-precision model
    fp16, ppl_fp16, base_fp16 = _ppl(tmp_path, "fp16", data_dir, "method=fp16", "act=int8_static", "observer=mse")
    assert ppl_fp16 != base_fp16 and fp16["avg_bits"] == 16.0 and fp16["calib"]["n_sequences"] == 4
    assert fp16["act"]["observer"]["name"] == "mse" and len(fp16["act"]["layers"]) == 14


def test_cli_w8a8_packed_runs_the_integer_matmul(tmp_path, data_dir):
    """eval.backend=packed routes W8 per-channel symmetric weights with dynamic int8 per-token inputs
    to torch._int_mm (kernels/int8.py): the same perplexity as fake-quant to float rounding; a
    grouped weight keeps the fake-quant input in front of its packed weight."""
    private_cache(tmp_path)
    w8a8 = ("method=rtn", "bits=8", "group_size=-1", "method.sym=true", "act=int8_per_token")
    fake, ppl_fake, _ = _ppl(tmp_path, "fake", data_dir, *w8a8)
    packed, ppl_packed, _ = _ppl(tmp_path, "packed", data_dir, *w8a8, "eval.backend=packed")
    assert fake["act"]["kernels"] == {"fake_quant": 14}
    assert packed["act"]["kernels"] == {"int8_int_mm": 14} and packed["act"]["quantized_linears"] == 14
    assert ppl_packed == pytest.approx(ppl_fake, rel=1e-4) and ppl_packed != fake["baseline"]["ppl"]["pydocs"]["value"]
    reference, ppl_reference, _ = _ppl(tmp_path, "reference", data_dir, *w8a8, "eval.backend=packed",
                                       "eval.kernel=reference")
    assert reference["act"]["kernels"] == {"fake_quant": 14} and ppl_reference == pytest.approx(ppl_fake, rel=1e-4)
    grouped, _, _ = _ppl(tmp_path, "grouped", data_dir, "method=rtn", "bits=8", "group_size=32", "method.sym=true",
                         "act=int8_per_token", "eval.backend=packed")
    assert grouped["act"]["kernels"] == {"fake_quant": 14}


def test_cli_smoothquant_w8a8_with_a_skipped_linear(tmp_path, data_dir):
    private_cache(tmp_path)
    record, ppl, base = _ppl(tmp_path, "sq", data_dir, "method=smoothquant", "act=int8_static",
                             "modules=[{match: 'layers.1.self_attn', skip: true}]")  # SmoothQuant's groups stay whole
    assert ppl != base and record["act"]["quantized_linears"] == 10
    assert "model.layers.1.self_attn.o_proj" not in record["act"]["layers"]
    assert "model.layers.1.mlp.up_proj" in record["act"]["layers"]
    record, ppl_dynamic, _ = _ppl(tmp_path, "sq-dyn", data_dir, "method=smoothquant", "act=int8_per_token")
    assert record["act"]["mode"] == "dynamic" and "layers" not in record["act"]
