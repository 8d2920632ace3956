"""The cost benchmark's split of recorded layer times into a method's stages."""

import json

import pytest

from quantlab.experiments.benchmarks.method_cost import main, split_by_stage


def _layer(name, seconds, **stages):
    return {"name": name, "seconds": seconds, "info": {f"{k}_seconds": v for k, v in stages.items()}}


def test_stages_sum_per_key_and_the_rest_is_other():
    layers = [
        _layer("model.layers.0.self_attn.q_proj", 3.0, hessian=0.5, search=1.0, solver=1.0),
        _layer("model.layers.0.mlp.down_proj", 5.0, hessian=0.5, search=2.0, solver=2.5),
    ]
    split = split_by_stage(layers)
    assert split["search"] == pytest.approx(3.0) and split["solver"] == pytest.approx(3.5)
    assert split["other"] == pytest.approx(0.5)  # q_proj's 0.5 s outside its stages
    assert split["total"] == pytest.approx(8.0)


def test_a_total_key_is_not_counted_as_a_stage():
    """VPTQ's quantize_seconds holds its kmeans and pass seconds: counting it would double them."""
    split = split_by_stage([_layer("b.0.q", 4.0, kmeans=3.0, quantize=3.5, forward=0.2)])
    assert "quantize" not in split
    assert split["kmeans"] + split["forward"] + split["other"] == pytest.approx(4.0)


def test_record_mode_prints_both_sides_and_their_ratio(tmp_path, capsys):
    record = {
        "method": "slim_llm", "bits": 2, "group_size": 128, "timings": {"quantize_s": 30.0},
        "layers": [_layer("model.layers.0.mlp.up_proj", 20.0, search=5.0, solver=15.0)],
        "comparisons": [{"method": "gptq", "bits": 2, "group_size": 128, "timings": {"quantize_s": 20.0},
                         "layers": [_layer("model.layers.0.mlp.up_proj", 12.0, solver=12.0)]}],
    }
    (tmp_path / "result.json").write_text(json.dumps(record))
    main(["--record", str(tmp_path / "result.json")])
    out = capsys.readouterr().out
    assert "search" in out and "25.0%" in out
    assert "slim_llm / gptq: 1.50x" in out
