"""Allocation to a bit budget: the greedy on hand-made maps, the rules it writes, and the checks
that refuse a bad budget or a record of another model before anything loads."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from fractions import Fraction

import pytest

from quantlab.experiments.run.allocation import UnitCosts, greedy_allocation, unit_rules
from quantlab.experiments.run.cli import load_group_option
from quantlab.experiments.run.module_rules import check_matches, linear_paths, parse_rules
from quantlab.experiments.run.schema import model_spec, validate
from quantlab.methods import ConfigError
from quantlab.methods.rtn import RTNConfig
from tests.conftest import compose_config

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def _unit(name: str, damage: dict[int, float], numel: int = 100) -> UnitCosts:
    return UnitCosts(name, numel, {w: w * numel for w in damage}, damage)


def test_greedy_takes_the_largest_damage_reduction_per_bit_first_and_meets_the_budget():
    units = [_unit("a", {2: 10, 3: 4, 4: 3}), _unit("b", {2: 5, 3: 4.5, 4: 4.4}), _unit("c", {2: 20, 3: 2, 4: 1})]
    widths, steps = greedy_allocation(units, [2, 3, 4], 3.0)
    # per bit: c 2->3 = 0.18 first; then a 2->3 = 0.06; then a 3->4 and c 3->4 tie at 0.01 (a: earlier unit)
    assert [(s["unit"], s["to"]) for s in steps] == [("c", 3), ("a", 3), ("a", 4)]
    assert widths == {"a": 4, "b": 2, "c": 3}
    assert sum(u.bits[widths[u.name]] for u in units) == 900  # exactly 3.0 x 300 weights


def test_greedy_never_exceeds_the_budget_and_stops_only_when_no_useful_upgrade_fits():
    rng = random.Random(1)
    for _ in range(50):
        units = []
        for i in range(rng.randint(1, 12)):
            numel = rng.choice([64, 100, 4096])
            overhead = rng.randint(0, 40)
            damage = sorted((rng.random() for _ in range(4)), reverse=True)
            units.append(UnitCosts(f"u{i}", numel, {w: w * numel + overhead for w in (2, 3, 4, 8)},
                                   dict(zip((2, 3, 4, 8), damage))))
        target = rng.uniform(2.5, 8.5)
        budget = Fraction(str(target)) * sum(u.numel for u in units)
        try:
            widths, _ = greedy_allocation(units, [2, 3, 4, 8], target)
        except ConfigError as error:
            assert "below the lowest choice" in str(error)
            assert sum(u.bits[2] for u in units) > budget
            continue
        spent = sum(u.bits[widths[u.name]] for u in units)
        assert spent <= budget
        for u in units:
            for w in (w for w in (3, 4, 8) if w > widths[u.name]):
                fits = spent - u.bits[widths[u.name]] + u.bits[w] <= budget
                assert not (fits and u.damage[w] < u.damage[widths[u.name]]), (u.name, w)


def _record(tmp_path, name: str = "tiny-llama", group_size: int = 32, bits=(2, 3, 4, 8)):
    """A sensitivity record over tiny-llama's 14 linears, with made-up damages and bit counts."""
    spec = model_spec(load_group_option("model", name))
    rng = random.Random(0)
    units = []
    for path in linear_paths("model.layers", 2, LINEARS):
        numel = 64 * 64
        units.append({"name": path, "block": int(path.split(".")[2]), "role": path.split(".", 3)[3], "linears": [path],
                      "numel": numel, "widths": {str(w): {"storage_bits": w * numel + 32 * 16 * 2,
                                                          "nll_delta": {"mean_nll_delta": rng.random() / w},
                                                          "kl": {"mean_kl": rng.random() / w}} for w in bits}})
    record = {"version": 1, "model": {"spec": asdict(spec), "fingerprint": None}, "unit": "linear",
              "bits": list(bits), "group_size": group_size, "units": units}
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(record))
    return path, record


def test_the_rules_written_are_exact_per_linear_and_module_rules_accepts_them(tmp_path):
    _, record = _record(tmp_path)
    widths = {unit["name"]: [2, 3, 4, 8][i % 4] for i, unit in enumerate(record["units"])}
    rules = parse_rules(unit_rules(record, widths), "rtn", RTNConfig(bits=4, group_size=32))
    paths = linear_paths("model.layers", 2, LINEARS)
    taken = check_matches(rules, paths)  # each rule matches, none shadowed
    assert all(len(names) == 1 for names in taken.values())
    assert {rule.config.bits for rule in rules} == {2, 3, 4, 8}
    block_record = {"unit": "block", "units": [{"name": "model.layers.0"}, {"name": "model.layers.1"}]}
    block_rules = parse_rules(unit_rules(block_record, {"model.layers.0": 8, "model.layers.1": 2}), "rtn",
                              RTNConfig(bits=4, group_size=32))
    taken = check_matches(block_rules, paths + ["model.layers.10.mlp.up_proj"])
    assert [len(v) for v in taken.values()] == [7, 7]  # block 1's regex does not take block 10's linears


def _validate(*overrides: str):
    return validate(compose_config("model=tiny-llama", "method=rtn", "group_size=32", *overrides), load_group_option)


def test_a_valid_allocation_becomes_the_runs_rules_with_a_predicted_average(tmp_path):
    path, record = _record(tmp_path)
    run = _validate("allocation.target_bits=3.0", f"allocation.sensitivity={tmp_path}")
    plan = run.allocation
    assert plan.predicted_avg_bits <= 3.0 and len(run.modules) == 14
    numel = sum(u["numel"] for u in record["units"])
    bits = sum(u["widths"][str(plan.widths[u["name"]])]["storage_bits"] for u in record["units"])
    assert plan.predicted_avg_bits == bits / numel


@pytest.mark.parametrize("overrides, message", [
    (["allocation.target_bits=1.5"], "below the lowest choice"),
    (["allocation.target_bits=2.0"], "below the lowest choice: every unit at 2 bits already averages"),
    (["allocation.target_bits=3.0", "allocation.choices=[2,5]"], r"width\(s\) \[5\] were not measured"),
    (["allocation.target_bits=3.0", "group_size=64"], "measured group_size=32"),
    (["allocation.target_bits=3.0", "modules=[{match: q_proj, bits: 8}]"], "writes the per-module rules itself"),
    (["allocation.target_bits=3.0", "allocation.damage=ppl"], "allocation.damage='ppl' is not valid"),
    (["model=tiny-opt", "allocation.target_bits=3.0"], "measured on model 'tiny-llama', not on this run's 'tiny-opt'"),
])
def test_bad_allocations_are_refused_before_the_model_loads(tmp_path, overrides, message):
    _record(tmp_path)
    with pytest.raises(ConfigError, match=message):
        _validate(f"allocation.sensitivity={tmp_path}", *overrides)


def test_a_missing_record_and_a_budget_without_a_record_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        _validate("allocation.target_bits=3.0", f"allocation.sensitivity={tmp_path / 'nothing.json'}")
    with pytest.raises(ConfigError, match="needs allocation.sensitivity"):
        _validate("allocation.target_bits=3.0")


def _brute_force(units: list[UnitCosts], widths: list[int], target: float) -> float:
    import itertools

    budget = Fraction(str(target)) * sum(u.numel for u in units)
    best = float("inf")
    for combo in itertools.product(widths, repeat=len(units)):
        if sum(u.bits[w] for u, w in zip(units, combo)) <= budget:
            best = min(best, sum(u.damage[w] for u, w in zip(units, combo)))
    return best


def test_dp_is_optimal_where_the_greedy_is_not_and_stays_within_the_budget():
    from quantlab.experiments.run.allocation import dp_allocation

    # greedy: b 2->3 first (per bit 0.08 > a's 0.07), then a's 2->8 no longer fits; optimum: a at 8
    units = [_unit("a", {2: 50, 3: 49, 8: 8}), _unit("b", {2: 10, 3: 2, 8: 1.9})]
    widths_g, _ = greedy_allocation(units, [2, 3, 8], 5.0)
    widths_d = dp_allocation(units, [2, 3, 8], 5.0)
    damage = {name: sum(u.damage[w[u.name]] for u in units) for name, w in (("greedy", widths_g), ("dp", widths_d))}
    assert widths_d == {"a": 8, "b": 2} and damage["dp"] == 18 < damage["greedy"]
    rng = random.Random(2)
    for _ in range(30):
        units = [UnitCosts(f"u{i}", 10, {w: w * 10 + rng.randint(0, 3) for w in (2, 3, 4, 8)},
                           dict(zip((2, 3, 4, 8), sorted((rng.random() for _ in range(4)), reverse=True))))
                 for i in range(rng.randint(1, 5))]
        target = rng.uniform(2.5, 8.5)
        if sum(u.bits[2] for u in units) > Fraction(str(target)) * sum(u.numel for u in units):
            continue
        widths = dp_allocation(units, [2, 3, 4, 8], target, buckets=10**6)  # one bit per quantum: exact
        assert sum(u.bits[widths[u.name]] for u in units) <= Fraction(str(target)) * sum(u.numel for u in units)
        assert sum(u.damage[widths[u.name]] for u in units) == pytest.approx(_brute_force(units, [2, 3, 4, 8], target))
        coarse = dp_allocation(units, [2, 3, 4, 8], target, buckets=7)  # rounded-up costs: still within budget
        assert sum(u.bits[coarse[u.name]] for u in units) <= Fraction(str(target)) * sum(u.numel for u in units)


def test_solver_dp_runs_through_the_config(tmp_path):
    _record(tmp_path)
    greedy = _validate("allocation.target_bits=3.0", f"allocation.sensitivity={tmp_path}").allocation
    dp = _validate("allocation.target_bits=3.0", "allocation.solver=dp", f"allocation.sensitivity={tmp_path}").allocation
    assert dp.solver == "dp" and dp.predicted_avg_bits <= 3.0
    assert dp.predicted_damage <= greedy.predicted_damage + 1e-12
    with pytest.raises(ConfigError, match="allocation.solver='knapsack' is not valid"):
        _validate("allocation.target_bits=3.0", "allocation.solver=knapsack", f"allocation.sensitivity={tmp_path}")


def test_a_record_of_other_weights_is_refused_once_the_model_loads(tmp_path):
    """Same spec, different weights (a re-drawn random model, a re-downloaded checkpoint): the
    fingerprint the record carries must be the loaded model's."""
    from types import SimpleNamespace

    from quantlab.experiments.run.flow import _check_allocation_model

    run = _validate("allocation.target_bits=3.0", f"allocation.sensitivity={_record(tmp_path)[0]}")
    run.allocation.model_fingerprint = "random:aaaa:seed=0"
    with pytest.raises(ConfigError, match="measured on weights random:aaaa:seed=0.*measure this model again"):
        _check_allocation_model(run, SimpleNamespace(fingerprint="random:bbbb:seed=0"))
    _check_allocation_model(run, SimpleNamespace(fingerprint="random:aaaa:seed=0"))
