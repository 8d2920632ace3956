"""experiment=sensitivity on tiny llama: end to end for both units, the damage ordering of widths,
and its allocation run whose measured avg_bits equals the predicted one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from quantlab.experiments.run.cli import load_group_option
from quantlab.experiments.run.schema import validate
from quantlab.experiments.run.sensitivity import (
    full_precision_hessians,
    measure_unit,
    reference_pass,
    units_of,
)
from quantlab.methods import ConfigError
from quantlab.methods.rtn import RTNConfig
from tests.conftest import _load, compose_config, run_quantlab
from tests.experiments.store.test_shared_inputs import private_cache

SMALL = ["model=tiny-llama", "calib.nsamples=4", "calib.seqlen=32", "sensitivity.seqlen=32", "sensitivity.windows=2",
         "sensitivity.fisher_samples=1", "group_size=32", "eval.kl.top_k=8", "eval.kl.tail_samples=0"]


def _cache(tmp_path):
    return tmp_path / "cache" if (tmp_path / "cache").is_dir() else private_cache(tmp_path)


def _run(tmp_path, name: str, *extra: str, data_dir) -> dict:
    proc = run_quantlab("experiment=sensitivity", *SMALL, f"paths.cache_dir={_cache(tmp_path)}",
                        f"hydra.run.dir={tmp_path / name}", *extra, QUANTLAB_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ρ vs ΔNLL at W" in proc.stdout and "--sensitivity" in proc.stdout  # the run ends with the ranking
    return json.loads((tmp_path / name / "sensitivity.json").read_text())


@pytest.fixture(scope="module")
def linear_record(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("sens")
    return tmp, _run(tmp, "linear", "method=rtn", "sensitivity.bits=[2,3]", data_dir=data_dir)


def _finite(record: dict, n_units: int, widths: list[int]) -> None:
    assert record["bits"] == widths and len(record["units"]) == n_units
    for unit in record["units"]:
        assert sorted(unit["widths"], key=int) == [str(w) for w in widths]
        for entry in unit["widths"].values():
            values = [entry["ppl"], entry["nll_delta"]["mean_nll_delta"], entry["nll_delta"]["ci_low"],
                      entry["kl"]["mean_kl"], entry["seconds"], *entry["proxies"].values()]
            assert all(math.isfinite(v) for v in values), unit["name"]
            assert set(entry["proxies"]) == {"hessian_trace_error", "output_error", "fisher_error"}


def test_unit_linear_end_to_end(linear_record):
    tmp, record = linear_record
    _finite(record, 14, [2, 3])
    assert record["unit"] == "linear" and record["units"][3]["role"] == "self_attn.o_proj"
    result = json.loads((tmp / "linear" / "result.json").read_text())
    assert result["status"] == "ok" and result["sensitivity"]["units"][0]["name"] == "model.layers.0.self_attn.q_proj"


def test_unit_block_end_to_end_with_gptq(tmp_path, data_dir):
    record = _run(tmp_path, "block", "method=gptq", "sensitivity.unit=block", "sensitivity.bits=[2,8]",
                  data_dir=data_dir)
    _finite(record, 2, [2, 8])
    assert [u["role"] for u in record["units"]] == ["block", "block"] and len(record["units"][0]["linears"]) == 7
    for unit in record["units"]:  # the proxies see 8 bits as far less damaging than 2
        assert unit["widths"]["8"]["proxies"]["output_error"] < unit["widths"]["2"]["proxies"]["output_error"] / 100


def test_allocation_from_the_record_runs_under_its_rules_at_the_predicted_bits(linear_record, data_dir):
    tmp, _ = linear_record
    proc = run_quantlab("model=tiny-llama", "method=rtn", "group_size=32", "calib=pydocs", "eval.ppl.datasets=[pydocs]",
                        "eval.ppl.seqlen=32", "eval.ppl.max_windows=2", "allocation.target_bits=2.75",
                        "allocation.choices=[2,3]", f"allocation.sensitivity={tmp / 'linear'}",
                        f"paths.cache_dir={_cache(tmp)}", f"hydra.run.dir={tmp / 'allocated'}",
                        QUANTLAB_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp / "allocated" / "result.json").read_text())
    plan = result["allocation"]
    assert plan["predicted_avg_bits"] == result["avg_bits"] and plan["predicted_matches_measured"]
    assert result["avg_bits"] <= 2.75 and {layer["bits"] for layer in result["layers"]} == {2, 3}
    assert sorted(plan["widths"].items()) == sorted((layer["name"], layer["bits"]) for layer in result["layers"])
    assert (tmp / "allocated" / "allocation_rules.yaml").read_text().count("match: ") == 14


def test_eight_bits_damage_a_unit_less_than_two_bits():
    """On a model whose predictions are not near-uniform (the final norm's gain scaled up: a random
    model's are), each block quantized at 8 bits moves the NLL and the KL less than at 2. (On
    random windows the NLL may move either way, so its size is compared.)"""
    loaded = _load("tiny-llama")
    model, arch = loaded.model, loaded.architecture
    with torch.no_grad():
        model.model.norm.weight.mul_(40)  # logits x40
    generator = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=generator)
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=generator)
    hessians = full_precision_hessians(model, arch, calib, torch.device("cpu"), 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = reference_pass(model, arch, windows, 2, top_k=16, tail_samples=0)
    for unit in units_of(arch, model, "block"):
        low, high = (measure_unit(model, arch, reference, unit["linears"], "rtn", RTNConfig(bits=b, group_size=32),
                                  hessians, {}) for b in (2, 8))
        assert abs(high["nll_delta"]["mean_nll_delta"]) < abs(low["nll_delta"]["mean_nll_delta"]), unit["name"]
        assert -1e-9 <= high["kl"]["mean_kl"] < low["kl"]["mean_kl"] / 10, unit["name"]  # a bound >= 0 up to rounding
    for name, param in model.named_parameters():  # every weight restored
        assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("overrides, message", [
    (["sensitivity.unit=layer"], "sensitivity.unit='layer' is not valid; choose one of: linear, block"),
    (["method=awq"], "use method=rtn or method=gptq"),
    (["sensitivity.bits=[2,5]"], "sensitivity.bits: method 'gptq' cannot quantize to bits=5"),
    (["sensitivity.windows=1"], "at least 2 windows"),
    (["modules=[{match: q_proj, bits: 8}]"], "drop modules="),
])
def test_bad_sensitivity_configs_are_refused_before_the_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config("experiment=sensitivity", "model=tiny-llama", *overrides), load_group_option)
