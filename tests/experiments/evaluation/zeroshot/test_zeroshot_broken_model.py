"""The paired comparison on a real model: RTN W2 breaks SmolLM2-135M, and the paired interval
says so on 20 LAMBADA items; the model compared with itself gives a zero interval."""

import pytest
import torch

from quantlab.experiments.evaluation.statistics import task_delta
from quantlab.experiments.evaluation.zeroshot.runner import evaluate_tasks
from quantlab.experiments.evaluation.zeroshot.tasks import resolve_tasks
from quantlab.experiments.run.pipeline import quantize_model
from quantlab.methods.rtn import RTN, RTNConfig

pytestmark = pytest.mark.slow


def test_rtn_w2_shows_a_significant_drop(smollm2, fresh_smollm2, data_dir):
    tasks = resolve_tasks(["lambada_openai"], data_dir, "local")
    baseline = evaluate_tasks(smollm2.model, smollm2.tokenizer, tasks, data_dir, limit=20, batch_size=8).results
    items = baseline["lambada_openai"].items
    assert sum(items["acc"]) >= 4  # SmolLM2 gets a fair share of LAMBADA's last words right
    itself = task_delta(items, items)
    assert (itself["value"], itself["ci_low"], itself["ci_high"]) == (0.0, 0.0, 0.0)

    quantize_model(fresh_smollm2.model, fresh_smollm2.architecture, RTN(RTNConfig(bits=2, group_size=128)), None,
                   torch.device("cpu"))
    broken = evaluate_tasks(fresh_smollm2.model, fresh_smollm2.tokenizer, tasks, data_dir, limit=20, batch_size=8).results
    delta = task_delta(broken["lambada_openai"].items, items)
    assert delta["ci_high"] < 0 and delta["significant"]
    assert delta["lost"] > delta["gained"]
