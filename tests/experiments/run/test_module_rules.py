"""Per-module rules: parsing and its errors, first-match precedence, matching checks, segments."""

from __future__ import annotations

import pytest

from quantlab.experiments.run.module_rules import check_matches, parse_rules, rule_for, segments
from quantlab.methods import ConfigError
from quantlab.methods.gptq import GPTQConfig

PATHS = [f"model.layers.{i}.{name}" for i in range(3) for name in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def rules(*items, base=None):
    return parse_rules(list(items), "gptq", base or GPTQConfig(bits=3, group_size=128))


def test_first_matching_rule_wins_and_builds_its_config():
    parsed = rules({"match": r"layers\.0\.", "bits": 8}, {"match": "down_proj", "skip": True},
                   {"match": "self_attn", "group_size": 64, "method": {"damp": 0.05}})
    assert rule_for(parsed, "model.layers.0.mlp.down_proj").index == 0  # rule 0 first, not the skip
    assert rule_for(parsed, "model.layers.1.mlp.down_proj").skip
    attn = rule_for(parsed, "model.layers.2.self_attn.q_proj")
    assert (attn.config.bits, attn.config.group_size, attn.config.damp) == (3, 64, 0.05)
    assert rule_for(parsed, "model.layers.2.mlp.up_proj") is None  # the run's own config
    assert parsed[0].config.bits == 8 and parsed[0].config.group_size == 128 and parsed[0].config.damp == 0.01
    taken = check_matches(parsed, PATHS)
    assert len(taken[0]) == 7 and len(taken[1]) == 2 and len(taken[2]) == 8


@pytest.mark.parametrize("item, message", [
    ({"bits": 4}, "needs `match`"),
    ({"match": "(", "bits": 4}, "not a valid regular expression"),
    ({"match": "q_proj", "bitz": 4}, "unknown keys"),
    ({"match": "q_proj"}, "changes nothing"),
    ({"match": "q_proj", "skip": True, "bits": 4}, "skip=true"),
    ({"match": "q_proj", "bits": 9}, "bits=9"),
    ({"match": "q_proj", "method": {"dampp": 0.1}}, "no knob"),
    ({"match": "q_proj", "method": {"damp": -1}}, "damp"),
    ("q_proj", "must be a mapping"),
])
def test_bad_rules_are_refused_naming_the_rule(item, message):
    with pytest.raises(ConfigError, match=message) as info:
        rules({"match": "o_proj", "bits": 4}, item)
    assert "modules[1]" in str(info.value)


def test_a_rule_that_matches_nothing_or_is_shadowed_is_an_error():
    with pytest.raises(ConfigError, match=r"modules\[0\].*matches no decoder linear.*model.layers.0"):
        check_matches(rules({"match": "dense_4h", "bits": 4}), PATHS)
    with pytest.raises(ConfigError, match=r"modules\[1\].*never applies.*modules\[0\]"):
        check_matches(rules({"match": "proj", "bits": 4}, {"match": "q_proj", "bits": 8}), PATHS)


def test_segments_are_maximal_runs_in_execution_order():
    parsed = rules({"match": "q_proj|down_proj", "bits": 8}, {"match": "o_proj", "skip": True})
    names = [p.removeprefix("model.layers.1.") for p in PATHS[7:14]]
    cut = segments(parsed, "model.layers.1", names)
    assert [(None if r is None else r.index, n) for r, n in cut] == [
        (0, ["self_attn.q_proj"]), (None, ["self_attn.k_proj", "self_attn.v_proj"]), (1, ["self_attn.o_proj"]),
        (None, ["mlp.gate_proj", "mlp.up_proj"]), (0, ["mlp.down_proj"]),
    ]
