"""The Python API (experiments/api.py) end to end on tiny models, and the README's example."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from quantlab import experiments
from quantlab.experiments import api
from quantlab.experiments.models.adapters import UnsupportedArchitecture
from quantlab.methods.base import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"


def token_ids(n: int, seqlen: int, seed: int, vocab: int = 49152) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_api_is_importable_from_the_package():
    assert experiments.quantize is api.quantize and experiments.load is api.load
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        experiments.quantise  # noqa: B018


@pytest.mark.parametrize("method, knobs", [("rtn", {}), ("gptq", {"act_order": True, "damp": 0.02})])
def test_quantize_evaluate_save_and_reload_tiny_llama(method, knobs, tiny_llama, tmp_path):
    model, windows = tiny_llama.model, token_ids(3, 32, seed=1)
    before = api.perplexity(model, windows)
    report = api.quantize(model, method, bits=4, group_size=32, calibration=token_ids(4, 32, seed=2),
                          batch_size=2, **knobs)
    assert report.method == method and all(report.method_config[k] == v for k, v in knobs.items())
    assert len(report.layers) == 2 * 7 and set(report.formats) == {r.name for r in report.layers}
    # exact bits: every format's storage over every quantized weight
    numel = sum(f.shape[0] * f.shape[1] for f in report.formats.values())
    assert report.avg_bits == sum(f.storage_bits() for f in report.formats.values()) / numel
    after = api.perplexity(model, windows)
    assert math.isfinite(after.value) and after.value != before.value
    assert after.window_nll != before.window_nll and after.ci_low < after.value < after.ci_high

    folder = api.save(model, report, tmp_path / "saved", tiny_llama.tokenizer)
    reloaded, tokenizer, info = api.load(folder)
    assert info["method"] == method and info["avg_bits"] == report.avg_bits
    assert tokenizer is not None and len(tokenizer) == len(tiny_llama.tokenizer)
    assert torch.equal(logits(reloaded, windows), logits(model, windows))  # fake-quant: bit for bit
    assert api.perplexity(reloaded, windows).window_nll == after.window_nll
    packed, _, _ = api.load(folder, backend="packed")  # low-bit modules: equal to their fp16 storage
    torch.testing.assert_close(logits(packed, windows), logits(model, windows), rtol=1e-2, atol=1e-2)


def test_the_readme_example_runs(tiny_llama, data_dir, tmp_path, monkeypatch):
    """The README's block, with its model id and text file pointed at a tiny model and local text."""
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    model_dir = tmp_path / "model"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    source = block.replace('"HuggingFaceTB/SmolLM2-135M"', repr(str(model_dir)))
    source = source.replace('"corpus.txt"', repr(str(data_dir / "wikitext2" / "wiki.test.raw")))
    assert source.count(str(model_dir)) == 1 and "wiki.test.raw" in source, "the README's example changed"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)  # its own assert: the reload is bit for bit
    assert (tmp_path / "gptq-w4" / "quantization.json").is_file()
    assert namespace["quantized"].value != namespace["baseline"].value
    assert 4 < namespace["report"].avg_bits < 5


def test_a_derived_family_through_the_api():
    config = transformers.Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    calibration = token_ids(4, 16, seed=3, vocab=128)
    report = api.quantize(model, "gptq", bits=3, group_size=32, calibration=calibration)
    assert {r.name.rsplit(".", 2)[-1] for r in report.layers} >= {"qkv_proj", "gate_up_proj"}
    with pytest.raises(UnsupportedArchitecture, match=r"'awq'.*'phi3' has no table"):
        api.quantize(model, "awq", calibration=calibration)


@pytest.mark.parametrize("config_class", [transformers.Phi3Config, transformers.Gemma2Config])
def test_derived_families_reload_bit_for_bit(config_class, tmp_path):
    """Gemma 2's embedding scale is a buffer in no file; Phi-3 under eager attention would reload as sdpa."""
    config = config_class(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    report = api.quantize(model, "rtn", bits=4, group_size=32)
    reloaded, _, _ = api.load(api.save(model, report, tmp_path))
    windows = token_ids(2, 16, seed=4, vocab=128)
    assert torch.equal(logits(reloaded, windows), logits(model, windows))


@pytest.mark.parametrize("call, error, message", [
    (lambda m: api.quantize(m, "gptqq"), ConfigError, r"unknown method 'gptqq'; valid: .*gptq.*rtn"),
    (lambda m: api.quantize(m, "gptq", act_ordr=True, calibration=token_ids(2, 8, 0)), ConfigError,
     r"no knob 'act_ordr' \(did you mean 'act_order'\?\); its knobs: .*damp"),
    (lambda m: api.quantize(m, "gptq", damp="lots", calibration=token_ids(2, 8, 0)), ConfigError, r"damp"),
    (lambda m: api.quantize(m, "rtn", bits=1), ConfigError, r"bits=1; valid: 2, 3"),
    (lambda m: api.quantize(m, "gptq"), ConfigError, r"pass calibration="),
    (lambda m: api.quantize(m, "onnx_int8"), ConfigError, r"onnxruntime.*quantlab CLI"),
    (lambda m: api.quantize(m, "gptq", calibration=torch.rand(2, 8)), ValueError, r"integer token ids.*float32"),
    (lambda m: api.quantize(m, "gptq", calibration=token_ids(2, 8, 0)[0]), ValueError, r"\[n, seqlen\].*\(8,\)"),
    (lambda m: api.perplexity(m, token_ids(2, 8, 0, vocab=10**6)), ValueError, r"outside the model's vocabulary"),
])
def test_bad_input_is_refused_before_any_work(call, error, message, tiny_llama):
    weights = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    with pytest.raises(error, match=message):
        call(tiny_llama.model)
    assert all(torch.equal(weights[k], v) for k, v in tiny_llama.model.state_dict().items())


def test_save_refuses_a_report_without_weights(tiny_llama, tmp_path):
    report = api.quantize(tiny_llama.model, "fp16", bits=16)
    with pytest.raises(ValueError, match="no quantized weights"):
        api.save(tiny_llama.model, report, tmp_path)
