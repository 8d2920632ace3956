"""AWQ end to end through the CLI on tiny llama: an ok record whose layers carry AWQ's choices and
its time split, calibrated with AWQ's own sampling rule."""

import json

from tests.conftest import run_quantlab
from tests.experiments.store.test_shared_inputs import private_cache


def test_quantlab_method_awq_on_tiny_llama_writes_an_ok_record(tmp_path, data_dir):
    cache = private_cache(tmp_path)
    overrides = [
        "model=tiny-llama",
        "method=awq",
        "bits=3",
        "group_size=32",
        "calib=pydocs",
        "calib.sampling=awq",
        "calib.nsamples=4",
        "calib.seqlen=64",
        "calib.seed=42",
        "eval.ppl.datasets=[pydocs]",
        "eval.ppl.seqlen=64",
        "eval.ppl.max_windows=4",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = run_quantlab(*overrides, QUANTLAB_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "ok" and record["method"] == "awq"
    assert record["config"]["method"]["duo_scaling"] is False and record["config"]["method"]["clip"] is True
    assert record["calib"]["sampling"].startswith("awq:") and record["calib"]["seed"] == 42
    # 4 lines of pydocs hold more than 64 tokens but fewer than 4 x 512: the blocks are counted
    assert record["calib"]["seqlen_used"] == 64 and 1 <= record["calib"]["n_sequences"]
    layers = record["layers"]
    assert len(layers) == 14 and all(layer["bits"] == 3 for layer in layers)
    for layer in layers:
        assert {"stats_seconds", "scale_seconds", "clip_seconds", "quant_seconds", "scale", "clip"} <= set(
            layer["info"]
        )
    assert any("alpha" in layer["info"]["scale"] for layer in layers)
    assert record["metrics"]["ppl"]["pydocs"]["value"] > 0
