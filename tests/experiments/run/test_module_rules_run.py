"""Per-module rules through the driver and the CLI on tiny llama: segments quantize what a plain run
would, skipped linears stay bit-identical, avg_bits stays exact, the record lists what each linear got."""

from __future__ import annotations

import json

import pytest
import torch

from quantlab.experiments.run.module_rules import parse_rules
from quantlab.experiments.run.pipeline import quantize_model
from quantlab.methods import ConfigError
from quantlab.methods.awq import AWQ, AWQConfig
from quantlab.methods.gptq import GPTQ, GPTQConfig
from quantlab.methods.rtn import RTN, RTNConfig
from tests.conftest import _load, run_quantlab
from tests.experiments.store.test_shared_inputs import private_cache

CPU = torch.device("cpu")


def _calib(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))


def test_a_later_segment_leaves_the_earlier_ones_as_a_plain_run_makes_them():
    """GPTQ is true-sequential: block 0's attention does not see its MLP, so with the MLP at 3 bits
    by a rule, block 0's attention linears equal those of a plain W4 run bit for bit."""
    plain, ruled = _load("tiny-llama"), _load("tiny-llama")
    calib = _calib(plain.model.config.vocab_size)
    base = GPTQConfig(bits=4, group_size=32)
    quantize_model(plain.model, plain.architecture, GPTQ(base), calib, CPU, 2, progress=False)
    rules = parse_rules([{"match": r"\.mlp\.", "bits": 3}], "gptq", base)
    report = quantize_model(ruled.model, ruled.architecture, GPTQ(base), calib, CPU, 2, progress=False, rules=rules)
    block = "model.layers.0.self_attn."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(ruled.model.get_submodule(block + name).weight, plain.model.get_submodule(block + name).weight)
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.mlp.down_proj"].bits == 3 and by_name["model.layers.0.mlp.down_proj"].info["rule"] == 0
    assert by_name["model.layers.1.self_attn.q_proj"].bits == 4 and by_name["model.layers.1.self_attn.q_proj"].info["rule"] is None
    assert not torch.equal(ruled.model.get_submodule("model.layers.0.mlp.down_proj").weight,
                           plain.model.get_submodule("model.layers.0.mlp.down_proj").weight)


def test_a_rule_over_every_linear_is_the_plain_run_at_its_settings():
    ruled, plain = _load("tiny-llama"), _load("tiny-llama")
    calib = _calib(plain.model.config.vocab_size)
    quantize_model(plain.model, plain.architecture, GPTQ(GPTQConfig(bits=3, group_size=16, damp=0.05)), calib, CPU, 2,
                   progress=False)
    base = GPTQConfig(bits=4, group_size=32)
    rules = parse_rules([{"match": ".", "bits": 3, "group_size": 16, "method": {"damp": 0.05}}], "gptq", base)
    report = quantize_model(ruled.model, ruled.architecture, GPTQ(base), calib, CPU, 2, progress=False, rules=rules)
    for (name, a), (_, b) in zip(ruled.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(a, b), name
    assert {r.info["damp"] for r in report.layers} == {0.05}


def test_skipped_linears_stay_bit_identical_and_count_at_16_bits():
    loaded = _load("tiny-llama")
    model, arch = loaded.model, loaded.architecture
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rules = parse_rules([{"match": "down_proj$", "skip": True}, {"match": r"layers\.0\.", "bits": 8}], "rtn",
                        RTNConfig(bits=3, group_size=32))
    report = quantize_model(model, arch, RTN(RTNConfig(bits=3, group_size=32)), None, CPU, 2, progress=False, rules=rules)
    assert sorted(report.skipped) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    for name in report.skipped:
        assert torch.equal(model.get_submodule(name).weight, before[name + ".weight"])
        assert name not in report.formats
    assert {r.bits for r in report.layers if r.name.startswith("model.layers.0.")} == {8}
    assert {r.bits for r in report.layers if r.name.startswith("model.layers.1.")} == {3}
    skipped_numel = sum(rows * cols for rows, cols in report.skipped.values())
    numel = sum(r.shape[0] * r.shape[1] for r in report.layers) + skipped_numel
    expected = (sum(f.storage_bits() for f in report.formats.values()) + 16 * skipped_numel) / numel
    assert report.avg_bits == pytest.approx(expected, rel=1e-12) and 3 < report.avg_bits < 16


def test_awq_refuses_rules_that_split_a_scaling_group():
    from quantlab.experiments.run.module_rules import check_model

    loaded = _load("tiny-llama")
    rules = parse_rules([{"match": "q_proj", "bits": 4}], "awq", AWQConfig(bits=3, group_size=32))
    with pytest.raises(ConfigError, match="scales .*q_proj.*together"):
        check_model(rules, loaded.architecture, loaded.model, AWQ)
    whole = parse_rules([{"match": r"layers\.0\.", "bits": 4}], "awq", AWQConfig(bits=3, group_size=32))
    check_model(whole, loaded.architecture, loaded.model, AWQ)  # a whole block: fine


def _overrides(tmp_path, *extra: str) -> list[str]:
    return [
        "model=tiny-llama", "calib=pydocs", "calib.nsamples=4", "calib.seqlen=64", "eval.ppl.datasets=[pydocs]",
        "eval.ppl.seqlen=64", "eval.ppl.max_windows=2", f"paths.cache_dir={private_cache(tmp_path)}",
        f"hydra.run.dir={tmp_path / 'run'}", *extra,
    ]


def test_cli_rules_are_recorded_with_what_each_linear_got(tmp_path, data_dir):
    proc = run_quantlab(*_overrides(tmp_path, "method=gptq", "bits=3", "group_size=32", "rules=skip_down_proj",
                                    "modules=[{match: 'layers.0.self_attn', bits: 8},{match: 'down_proj$', skip: true}]"),
                        QUANTLAB_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    summary = record["module_rules"]
    assert [rule["linears"] for rule in summary] == [4, 2]
    assert summary[0]["bits"] == 8 and summary[0]["bits_per_weight"] > 8 and summary[1]["skip"]
    assert len(record["layers"]) == 12 and {layer["info"]["rule"] for layer in record["layers"]} == {0, None}
    quantized = sum(layer["storage_bits"] for layer in record["layers"])
    numel = sum(layer["shape"][0] * layer["shape"][1] for layer in record["layers"])
    skipped = 2 * 64 * 160  # tiny llama's down_proj: 160 -> 64, in both blocks
    assert record["avg_bits"] == pytest.approx((quantized + 16 * skipped) / (numel + skipped))


def test_cli_refuses_a_rule_that_matches_nothing(tmp_path, data_dir):
    proc = run_quantlab(*_overrides(tmp_path, "method=rtn", "modules=[{match: fc2, bits: 8}]"),
                        QUANTLAB_DATA_DIR=str(data_dir))
    assert proc.returncode == 2
    assert "modules[0]" in proc.stderr and "matches no decoder linear" in proc.stderr
