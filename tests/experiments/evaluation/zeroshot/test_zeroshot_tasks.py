"""Local task definitions against lm-eval's own: same items, same requests, same per-item results.

The reference is lm-eval's built-in YAML of each task with only its data source replaced: JSON
lines in the hub dataset's fields, converted here from the same local files by code independent
of experiments/evaluation/zeroshot/local_data.py."""

import pytest

from quantlab.experiments.evaluation.zeroshot.parity import REPRODUCED, compare_on_model, reference_config
from quantlab.experiments.evaluation.zeroshot.tasks import resolve_tasks, task_manager
from quantlab.methods.base import ConfigError

PUBLISHED = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag_local": 10042, "winogrande": 1267,
             "boolq": 3270, "lambada_openai": 5153}


@pytest.fixture(scope="module")
def local_tasks(data_dir, tmp_path_factory):
    resolved = resolve_tasks(list(PUBLISHED), data_dir, "local")
    manager = task_manager(resolved, data_dir, tmp_path_factory.mktemp("local"))
    return manager, manager.load(list(PUBLISHED))["tasks"]


@pytest.fixture(scope="module")
def reference_configs(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    return {task: reference_config(task, data_dir, folder) for task in REPRODUCED}


def test_item_counts_are_the_published_sizes(local_tasks):
    manager, tasks = local_tasks
    assert {name: len(task.eval_docs) for name, task in tasks.items()} == PUBLISHED
    # only the generated YAMLs were indexed, not lm-eval's thousands of built-in tasks
    assert set(manager.all_subtasks) == set(PUBLISHED)


def _compare_requests(local_tasks, reference_configs, limit):
    from lm_eval.tasks import TaskManager

    _, tasks = local_tasks
    reference = TaskManager(include_defaults=False).load(list(reference_configs.values()))["tasks"]
    for name in REPRODUCED:
        ours, theirs = tasks[name], reference[name]
        ours.build_all_requests(limit=limit, rank=0, world_size=1)
        theirs.build_all_requests(limit=limit, rank=0, world_size=1)
        assert len(ours.instances) == len(theirs.instances) > 0, name
        for a, b in zip(ours.instances, theirs.instances):
            assert (a.doc_id, a.idx, a.request_type, a.args) == (b.doc_id, b.idx, b.request_type, b.args), name
        assert ours.config.metric_list == theirs.config.metric_list
        docs = list(ours.eval_docs)[:limit]
        assert [ours.doc_to_target(d) for d in docs] == [theirs.doc_to_target(d) for d in list(theirs.eval_docs)[:limit]]


def test_requests_equal_lm_evals_own_definition(local_tasks, reference_configs):
    _compare_requests(local_tasks, reference_configs, limit=100)


@pytest.mark.slow  # every item of the six tasks: about a minute of prompt rendering, no model
def test_every_request_equals_lm_evals_own_definition(local_tasks, reference_configs):
    _compare_requests(local_tasks, reference_configs, limit=None)


def test_per_item_results_equal_lm_evals_on_a_model(tiny_llama, data_dir, tmp_path):
    """tiny-llama has SmolLM2's tokenizer: the same token sequences are scored, so equal requests
    must give equal log-likelihoods; experiments/benchmarks/zeroshot_parity.py runs SmolLM2."""
    compared = compare_on_model(tiny_llama.model, tiny_llama.tokenizer, data_dir, tmp_path, limit=2)
    assert set(compared) == set(REPRODUCED)
    for task, entry in compared.items():
        assert entry["identical"] and entry["n"] == 2, task
        assert entry["acc"] == pytest.approx(entry["reference_acc"]), task


def test_resolution_offline_online_and_errors(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    offline = resolve_tasks(["piqa", "hellaswag"], data_dir, "auto")
    assert [(t.name, t.source) for t in offline] == [("piqa", "local"), ("hellaswag_local", "local")]
    assert offline[1].caveat and "hellaswag_local" in offline[1].caveat
    assert offline[0].protocol["n_items_total"] == 1838 and len(offline[0].protocol["files_sha256"]) == 12
    with pytest.raises(ConfigError, match="mmlu"):
        resolve_tasks(["mmlu"], data_dir, "auto")
    with pytest.raises(ConfigError, match="piqa/valid.jsonl"):
        resolve_tasks(["piqa"], tmp_path, "auto")
    hub = resolve_tasks(["piqa", "hellaswag"], data_dir, "hub")
    assert [(t.name, t.source) for t in hub] == [("piqa", "hub"), ("hellaswag", "hub")]
    # a hub run indexes only the folders of the tasks it names
    manager = task_manager(hub, data_dir, tmp_path / "unused")
    assert {"piqa", "hellaswag"} <= set(manager.all_subtasks) and len(manager.all_subtasks) < 10


def test_auto_prefers_the_local_files_without_the_offline_variables(data_dir, tmp_path, monkeypatch):
    """Without HF_DATASETS_OFFLINE=1 and without network, eval.tasks=[piqa] went to the hub (and
    failed after the model loaded) although the local files were there."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tasks = resolve_tasks(["piqa", "hellaswag"], data_dir, "auto")
    # hellaswag has no faithful local copy: online it stays lm-eval's own
    assert [(t.name, t.source) for t in tasks] == [("piqa", "local"), ("hellaswag", "hub")]
    assert tasks[0].protocol["source"] == "local" and tasks[0].protocol["files_sha256"]
    assert [t.source for t in resolve_tasks(["piqa"], tmp_path, "auto")] == ["hub"]  # no local files


def test_config_errors_come_before_any_model():
    from quantlab.experiments.run.schema import validate
    from tests.conftest import compose_config

    def check(*overrides):
        from quantlab.experiments.run.cli import load_group_option

        return validate(compose_config(*overrides), load_group_option)

    with pytest.raises(ConfigError, match="eval.kl.datasets"):
        check("eval.kl.enabled=true", "eval.kl.datasets=[c4]")
    with pytest.raises(ConfigError, match="eval.limit"):
        check("eval.tasks=[piqa]", "eval.limit=0")
    with pytest.raises(ConfigError, match="eval.task_source"):
        check("eval.task_source=web")
    run = check("eval=paper")
    assert run.eval.tasks[3] == "hellaswag" and run.eval.kl.enabled and len(run.eval.tasks) == 7


def test_few_shot_needs_a_training_split_offline(data_dir, monkeypatch):
    from quantlab.experiments.evaluation.zeroshot.stage import plan_tasks
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.schema import validate
    from tests.conftest import compose_config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = validate(compose_config("eval.tasks=[arc_easy]", "eval.num_fewshot=5"), load_group_option)
    with pytest.raises(ConfigError, match="num_fewshot"):
        plan_tasks(run.eval)
