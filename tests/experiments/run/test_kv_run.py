"""KV-cache quantization through the CLI on tiny-llama (experiments/run/flow.py): a run with kv=int4
evaluates every method entry through the quantized cache and records kv_bits and the cache's
measured memory; kv enters the config hash only when on."""

from __future__ import annotations

import json

import pytest

from quantlab.experiments.records.record import config_hash
from quantlab.experiments.records.reporting.records import entry_row
from quantlab.experiments.records.reporting.text import run_rows
from tests.conftest import compose_config, run_quantlab
from tests.experiments.store.test_shared_inputs import private_cache


def test_cli_kv_int4_records_kv_bits_and_the_caches_memory(tmp_path, data_dir):
    private_cache(tmp_path)
    proc = run_quantlab(
        "model=tiny-llama", "method=fp16", "compare_with=[rtn]", "kv=int4", "kv.chunk=16", "calib=pydocs",
        "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=2",
        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
        QUANTLAB_DATA_DIR=str(data_dir),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "ok"
    baseline = record["baseline"]["ppl"]["pydocs"]
    rtn = record["comparisons"][0]
    for entry in (record, rtn):
        kv = entry["kv"]
        assert (kv["bits"], kv["granularity"], kv["chunk"], kv["enabled"]) == (4, "per_token", 16, True)
        assert kv["shape"] == {"layers": 2, "kv_heads": 2, "head_dim": 16}
        for tokens in (2048, 8192):
            memory = kv["memory"][str(tokens)]
            elements = 2 * 2 * 2 * tokens * 16  # keys and values, layers, kv heads, head_dim
            assert memory["fp16_bytes"] == 2 * elements
            # per token and head: 16 codes of 4 bits (two int32 words) and an fp16 scale and minimum
            assert memory["bytes"] == elements // 16 * (8 + 4)
            assert memory["bits_per_element"] == pytest.approx(8 * memory["bytes"] / elements)
        assert entry["kv_bits"] == kv["memory"]["2048"]["bits_per_element"] == pytest.approx(6.0)
        # fp16 with kv on is evaluated through the quantized cache, not copied from the baseline
        ppl = entry["metrics"]["ppl"]["pydocs"]
        assert ppl["window_nll"] != baseline["window_nll"] and ppl["vs_baseline"] is not None
    assert record["avg_bits"] == 16.0 and rtn["avg_bits"] < 5  # avg_bits stays the weight figure
    assert record["config"]["kv"]["bits"] == 4
    # reports: the fp16 entry gets its own row (it evaluated something), kv in the frames' columns
    labels = [row["run"] for row in run_rows(record)]
    assert labels[1].startswith("fp16") and labels[1].endswith(" KV4") and labels[2].endswith(" KV4")
    row = entry_row(tmp_path / "run" / "result.json", record, 1, rtn)
    assert row["kv_bits"] == pytest.approx(6.0) and row["kv"] == "int4 per_token asym g-1 chunk16"


def test_kv_counts_in_the_config_hash_only_when_on():
    from omegaconf import OmegaConf

    def hashed(*overrides: str) -> str:
        return config_hash(OmegaConf.to_container(compose_config(*overrides), resolve=True))

    off = compose_config("kv=none")
    without = {k: v for k, v in OmegaConf.to_container(off, resolve=True).items() if k != "kv"}
    assert hashed("kv=none") == config_hash(without)  # weight-only runs keep their hashes
    assert hashed("kv=none", "kv.chunk=64") == hashed("kv=none")  # off: the chunk means nothing
    assert hashed("kv=int4") != hashed("kv=int8") != hashed("kv=none")
