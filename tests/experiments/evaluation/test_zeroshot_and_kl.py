"""Zero-shot tasks and KL through a whole run on a tiny random model: the record's fields, the
per-item file, the cached baseline outputs, a no-op method compared with the baseline, wandb keys
and the summary table."""

import json

import pytest

from quantlab.experiments.records.reporting.text import render, run_rows
from quantlab.experiments.records.tracking import fidelity_summary
from quantlab.experiments.run.cli import run_from_config
from quantlab.experiments.store.cache import computations
from tests.conftest import compose_config

TINY = [
    "model=tiny-llama", "method=rtn", "bits=4", "group_size=32", "calib=pydocs", "calib.nsamples=4",
    "calib.seqlen=64", "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=3",
    "eval.tasks=[boolq]", "eval.limit=3", "eval.kl.enabled=true", "eval.kl.top_k=8", "compare_with=[fp16]",
    "paths.cache_dir=${oc.env:QUANTLAB_CACHE_DIR}",
]


@pytest.fixture
def private_cache(tmp_path, monkeypatch, data_dir):
    from quantlab.experiments.store.cache import cache_root

    shared = cache_root()
    private = tmp_path / "cache"
    private.mkdir()
    if (shared / "models").exists():
        (private / "models").symlink_to(shared / "models")
    monkeypatch.setenv("QUANTLAB_CACHE_DIR", str(private))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return private


def test_a_run_records_tasks_deltas_and_kl(tmp_path, private_cache):
    record = run_from_config(compose_config(*TINY), tmp_path / "run", progress=False)
    metrics, baseline = record["metrics"], record["baseline"]
    task = metrics["tasks"]["boolq"]
    assert task["n"] == 3 and task["source"] == "local" and 0 <= task["acc"] <= 1 and "stderr" in task
    assert baseline["tasks"]["boolq"]["n"] == 3
    delta = metrics["delta"]["boolq"]
    assert delta["ci_low"] <= delta["value"] <= delta["ci_high"] and delta["n"] == 3
    kl = metrics["kl"]["pydocs"]
    assert kl["n_windows"] == 3 and kl["top_k"] == 8 and kl["mean_kl"] >= 0 and 0 <= kl["top1_agreement"] <= 1
    assert record["eval_protocol"]["tasks"]["boolq"]["limit"] == 3
    assert record["eval_protocol"]["kl"]["pydocs"]["estimator"] == "topk_plus_sampled_tail"
    # fp16 changes no weight: exactly the baseline, zero KL and a zero-width interval
    fp16 = record["comparisons"][0]["metrics"]
    assert fp16["kl"]["pydocs"]["mean_kl"] == 0.0 and fp16["kl"]["pydocs"]["top1_agreement"] == 1.0
    assert (fp16["delta"]["boolq"]["ci_low"], fp16["delta"]["boolq"]["ci_high"]) == (0.0, 0.0)
    items = json.loads((tmp_path / "run" / "zeroshot_items.json").read_text())
    assert set(items) == {"rtn W4 g32", "fp16 W16 g-1"}
    assert items["rtn W4 g32"]["boolq"]["doc_id"] == [0, 1, 2] and len(items["rtn W4 g32"]["boolq"]["loglik"][0]) == 2

    flat = fidelity_summary(record)
    assert flat["tasks/boolq/acc"] == task["acc"] and flat["kl/pydocs/mean_kl"] == kl["mean_kl"]
    assert flat["delta/boolq/ci_low"] == delta["ci_low"] and "baseline_tasks/boolq/acc" in flat
    table = render(run_rows(record))
    assert "acc boolq" in table and "KL/top1 pydocs" in table

    # a second run finds the baseline's task outcomes and KL summary in the cache
    run_from_config(compose_config(*TINY, "bits=3"), tmp_path / "again", progress=False)
    counts = computations(private_cache)
    assert sum(n for (kind, _), n in counts.items() if kind == "baseline_kl") == 1
    assert all(n == 1 for (kind, _), n in counts.items() if kind == "baseline")
