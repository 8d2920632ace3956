"""`quantlab method=owq` end to end on the tiny random llama: an ok record whose avg_bits counts
the fp16 columns, and the config errors before any model loads."""

import pytest

from quantlab.experiments.run.cli import run_from_config
from quantlab.methods.base import ConfigError
from tests.conftest import compose_config

TINY = [
    "model=tiny-llama",
    "method=owq",
    "bits=3",
    "group_size=-1",
    "calib=pydocs",
    "calib.nsamples=4",
    "calib.seqlen=64",
    "eval.ppl.datasets=[pydocs]",
    "eval.ppl.seqlen=64",
    "eval.ppl.max_windows=4",
]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    from quantlab.experiments.store.cache import cache_root

    shared, private = cache_root(), tmp_path / "cache"
    private.mkdir()
    if (shared / "models").exists():
        (private / "models").symlink_to(shared / "models")
    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(private))


def test_owq_run_records_fp16_columns_and_their_bits(tmp_path, private_cache):
    record = run_from_config(
        compose_config(*TINY, "method.n_outliers=4", "method.tuning=minmax"), tmp_path / "run", progress=False
    )
    assert record["status"] == "ok" and record["method"] == "owq"
    layers = record["layers"]
    assert len(layers) == 14
    expected_bits = 0
    for layer in layers:
        out_features, in_features = layer["shape"]
        info = layer["info"]
        assert info["n_outliers"] == 4 and len(set(info["outlier_idx"])) == 4
        assert all(0 <= j < in_features for j in info["outlier_idx"])
        # codes for the other columns, an fp16 scale and a 3-bit zero per row, fp16 columns + int32 index
        bits = out_features * (in_features - 4) * 3 + out_features * 19 + 4 * (16 * out_features + 32)
        assert layer["storage_bits"] == bits
        expected_bits += bits
    numel = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    assert record["avg_bits"] == pytest.approx(expected_bits / numel)
    assert record["metrics"]["ppl"]["pydocs"]["value"] > 1


def test_owq_config_errors_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="floor"):
        run_from_config(compose_config(*TINY, "method.target_bits=4.01"), tmp_path / "bad", progress=False)


@pytest.mark.parametrize(
    "experiment, bits, target, n_outliers, tuning",
    [
        ("llama7b-owq-w3-t3.01", 3, 3.01, None, "mse"),
        ("llama7b-owq-w4-t4.01", 4, 4.01, None, "mse"),
        ("llama7b-owq-gptq-w3", 3, None, 0, "minmax"),
        ("llama7b-owq-gptq-w4", 4, None, 0, "minmax"),
    ],
)
def test_paper_configs_follow_owqs_protocol(experiment, bits, target, n_outliers, tuning):
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.schema import validate

    run = validate(compose_config(f"experiment=paper/owq/{experiment}"), load_group_option)
    method = run.method
    assert run.method_name == "owq" and (method.bits, method.group_size) == (bits, -1)
    assert (method.target_bits, method.n_outliers, method.tuning) == (target, n_outliers, tuning)
    assert method.true_sequential is False and method.act_order is False and method.damp == 0.01
    assert run.calib.seqlen == run.eval.ppl.seqlen == 2048 and run.calib.nsamples == 128
    assert run.eval.ppl.datasets == ["wikitext2", "ptb-new", "c4-new"]
