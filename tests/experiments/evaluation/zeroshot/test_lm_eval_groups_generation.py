"""Full lm-eval on tiny task YAMLs written here (lm-eval's `dataset_path: json` over JSON lines,
offline): a group of two multiple-choice tasks and a generative task with two filters, run on
tiny-llama through a user's task folder (eval.include_path). The group and each subtask are
recorded, generation metrics do not crash, few-shot examples reach the prompts, and lm-eval's own
results and samples files are written by its EvaluationTracker and parse."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from quantlab.experiments.evaluation.statistics import mean_stderr
from quantlab.experiments.evaluation.zeroshot.results import entry_metrics
from quantlab.experiments.evaluation.zeroshot.runner import Prompting, evaluate_tasks
from quantlab.experiments.evaluation.zeroshot.stage import check_tokenizer, plan_tasks
from quantlab.experiments.evaluation.zeroshot.tasks import resolve_tasks
from quantlab.methods.base import ConfigError
from tests.conftest import compose_config
from tests.experiments.evaluation.test_zeroshot_and_kl import TINY, private_cache  # noqa: F401 (a fixture)

QUESTIONS = [("What is two plus two?", ["four", "five"], 0), ("Color of the clear sky?", ["green", "blue"], 1),
             ("Opposite of hot?", ["cold", "warm"], 0), ("Animal that barks?", ["cat", "dog"], 1)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _task_yaml(name: str, train: str, test: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {train}\n    test: {test}\n"
            f"fewshot_split: train\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Few-shot examples carry the marker SHOT, so a prompt shows how many it holds."""
    folder = tmp_path_factory.mktemp("tasks")
    for part in ("a", "b"):
        rows = [{"question": f"[{part}] {q}", "choices": c, "label": y} for q, c, y in QUESTIONS]
        train = _jsonl(folder / f"mc_{part}_train.jsonl", [dict(r, question="SHOT " + r["question"]) for r in rows])
        test = _jsonl(folder / f"mc_{part}_test.jsonl", rows)
        (folder / f"tiny_mc_{part}.yaml").write_text(_task_yaml(f"tiny_mc_{part}", train, test, (
            "output_type: multiple_choice\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (folder / "tiny_group.yaml").write_text(
        "group: tiny_group\ntask: [tiny_mc_a, tiny_mc_b]\naggregate_metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n")
    sums = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    train = _jsonl(folder / "gen_train.jsonl", [dict(s, question="SHOT " + s["question"]) for s in sums])
    test = _jsonl(folder / "gen_test.jsonl", sums)
    (folder / "tiny_gen.yaml").write_text(_task_yaml("tiny_gen", train, test, (
        "num_fewshot: 3\noutput_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "filter_list:\n  - name: raw\n    filter:\n      - function: take_first\n"
        "  - name: digits\n    filter:\n      - function: regex\n        regex_pattern: \"(\\\\d+)\"\n"
        "      - function: take_first\n")))
    return folder


@pytest.fixture(scope="module")
def evaluated(task_dir, data_dir, tmp_path_factory):
    from tests.conftest import _load

    tiny = _load("tiny-llama")
    tasks = resolve_tasks(["tiny_group", "tiny_gen"], data_dir, "auto", str(task_dir))
    output = tmp_path_factory.mktemp("lm_eval")
    run = evaluate_tasks(tiny.model, tiny.tokenizer, tasks, data_dir, prompting=Prompting(num_fewshot=2), limit=3,
                         output_dir=output)
    return tasks, run, tiny


def test_names_from_the_include_path_resolve_as_such(evaluated):
    tasks, _, _ = evaluated
    assert [(t.name, t.source, t.protocol["kind"]) for t in tasks] == [("tiny_group", "include", "group"),
                                                                       ("tiny_gen", "include", "task")]
    assert len(tasks[0].protocol["files_sha256"]) == 12


def test_a_group_and_each_subtask_are_recorded(evaluated):
    from lm_eval.api.metrics import pooled_sample_stderr

    _, run, _ = evaluated
    assert set(run.results) == {"tiny_group", "tiny_mc_a", "tiny_mc_b", "tiny_gen"}
    group = run.results["tiny_group"].metrics
    assert group["kind"] == "group" and group["subtasks"] == ["tiny_mc_a", "tiny_mc_b"] and group["n"] == 6
    subtasks = [run.results[name] for name in group["subtasks"]]
    for sub in subtasks:
        m, items = sub.metrics, sub.items
        assert m["kind"] == "task" and m["group"] == "tiny_group" and m["source"] == "include" and m["n"] == 3
        assert items["doc_id"] == [0, 1, 2] and len(items["loglik"][0]) == 2
        assert m["acc"] == pytest.approx(sum(items["acc"]) / 3) and m["stderr"] == pytest.approx(mean_stderr(items["acc"]))
        assert m["acc_norm_stderr"] == pytest.approx(mean_stderr(items["acc_norm"]))
    # lm-eval's own aggregate (size-weighted mean), its stderr pooled from the subtasks' as lm-eval pools
    all_acc = [a for sub in subtasks for a in sub.items["acc"]]
    assert group["acc"] == pytest.approx(sum(all_acc) / len(all_acc))
    assert group["stderr"] == pytest.approx(pooled_sample_stderr([s.metrics["stderr"] for s in subtasks], [3, 3]))
    assert not run.results["tiny_group"].items  # per-item outcomes live with the subtasks


def test_generative_metrics_per_filter_with_settings(evaluated):
    _, run, _ = evaluated
    gen = run.results["tiny_gen"]
    m = gen.metrics
    for name in ("exact_match,raw", "exact_match,digits"):
        assert 0.0 <= m[name] <= 1.0 and m[name] == pytest.approx(sum(gen.items[name]) / 3)
        assert m[name.replace(",", "_stderr,")] == pytest.approx(mean_stderr(gen.items[name]))
    assert m["config"]["output_type"] == "generate_until" and m["config"]["filters"] == ["raw", "digits"]
    assert m["config"]["generation_kwargs"]["max_gen_toks"] == 4 and m["config"]["generation_kwargs"]["until"] == ["\n"]
    assert "loglik" not in gen.items and gen.items["doc_id"] == [0, 1, 2]


def test_lm_evals_files_parse_and_hold_the_few_shot_prompts(evaluated):
    _, run, _ = evaluated
    results = json.loads(Path(run.files["results"]).read_text())
    assert results["group_subtasks"] == {"tiny_group": ["tiny_mc_a", "tiny_mc_b"]}
    assert results["results"]["tiny_group"]["acc,none"] == pytest.approx(run.results["tiny_group"].metrics["acc"])
    assert results["n-shot"]["tiny_gen"] == 2 and "task_hashes" in results
    assert set(run.files["samples"]) == {"tiny_mc_a", "tiny_mc_b", "tiny_gen"}
    for task, path in run.files["samples"].items():
        lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
        assert len(lines) == (6 if task == "tiny_gen" else 3)  # the generative task: one line per item and filter
        for sample in lines:
            prompt = sample["arguments"]["gen_args_0"]["arg_0"]
            assert prompt.count("SHOT ") == 2, prompt  # num_fewshot=2 examples from the train split
    assert run.results["tiny_mc_a"].metrics["config"]["num_fewshot"] == 2


def test_the_tasks_own_shots_without_num_fewshot(evaluated, data_dir, tmp_path):
    """eval.num_fewshot=null: each task's own default (tiny_gen's YAML says 3; 2 above overrode it)."""
    tasks, _, tiny = evaluated
    run = evaluate_tasks(tiny.model, tiny.tokenizer, tasks[1:], data_dir, prompting=Prompting(num_fewshot=None),
                         limit=1, output_dir=tmp_path)
    assert run.results["tiny_gen"].metrics["config"]["num_fewshot"] == 3
    sample = json.loads(Path(run.files["samples"]["tiny_gen"]).read_text().splitlines()[0])
    assert sample["arguments"]["gen_args_0"]["arg_0"].count("SHOT ") == 3


def test_chat_template_multiturn_and_system_instruction_reach_the_prompt(evaluated, data_dir, tmp_path):
    tasks, _, tiny = evaluated
    mc = resolve_tasks(["tiny_mc_a"], data_dir, "auto", tasks[0].protocol["include_path"])
    prompting = Prompting(num_fewshot=1, apply_chat_template=True, fewshot_as_multiturn=True,
                          system_instruction="Answer briefly.")
    run = evaluate_tasks(tiny.model, tiny.tokenizer, mc, data_dir, prompting=prompting, limit=1, output_dir=tmp_path)
    sample = json.loads(Path(run.files["samples"]["tiny_mc_a"]).read_text().splitlines()[0])
    prompt = sample["arguments"]["gen_args_0"]["arg_0"]
    assert "Answer briefly." in prompt and "SHOT" in prompt
    assert prompt.count("<|im_start|>user") == 2  # the shot and the question, each its own turn
    header = json.loads(Path(run.files["results"]).read_text())
    assert header["fewshot_as_multiturn"] is True and header["chat_template"]


def test_text_and_unusable_metric_values_are_kept_or_skipped_with_a_reason():
    metrics = entry_metrics(
        {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "verdict,none": "pass",
         "counts,none": [1, 2], "ratio,none": float("nan"), "flag,none": True},
        {"doc_id": [0, 1], "acc": [1.0, 0.0]},
    )
    assert metrics["acc"] == 0.5 and metrics["stderr"] == pytest.approx(0.5)  # lm-eval's N/A filled from items
    assert metrics["verdict"] == "pass"
    assert set(metrics["skipped"]) == {"counts", "ratio", "flag"} and "list" in metrics["skipped"]["counts"]


def test_prompt_settings_are_validated_before_any_model(task_dir, monkeypatch):
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.schema import validate

    def check(*overrides):
        return validate(compose_config(*overrides), load_group_option)

    with pytest.raises(ConfigError, match="eval.fewshot_as_multiturn=true needs eval.apply_chat_template=true"):
        check("eval.fewshot_as_multiturn=true")
    assert check("eval.num_fewshot=null").eval.num_fewshot is None
    with pytest.raises(ConfigError, match="eval.num_fewshot"):
        check("eval.num_fewshot=-1")
    run = check("eval.apply_chat_template=true", f"eval.include_path={task_dir}", "eval.tasks=[tiny_gen]")
    assert run.eval.fewshot_as_multiturn is None and [t.source for t in plan_tasks(run.eval)] == ["include"]
    from quantlab.experiments.run.preflight import check_tasks

    assert check_tasks(run) == {"task:tiny_gen": f"include:{plan_tasks(run.eval)[0].protocol['files_sha256']}"}
    with pytest.raises(ConfigError, match="eval.include_path"):
        plan_tasks(check(f"eval.include_path={task_dir / 'absent'}", "eval.tasks=[tiny_gen]").eval)
    with pytest.raises(ConfigError, match="no chat template"):
        check_tokenizer(SimpleNamespace(chat_template=None), run.eval)


@pytest.mark.usefixtures("private_cache")
def test_a_run_records_groups_generation_prompt_settings_and_lm_evals_files(task_dir, tmp_path):
    from quantlab.experiments.records.reporting.text import render, run_rows
    from quantlab.experiments.records.tracking import fidelity_summary
    from quantlab.experiments.run.cli import run_from_config

    overrides = [o for o in TINY if not o.startswith(("eval.tasks", "eval.limit"))]
    config = compose_config(*overrides, "eval.tasks=[tiny_group,tiny_gen]", f"eval.include_path={task_dir}",
                            "eval.num_fewshot=1", "eval.limit=2")
    run_dir = tmp_path / "run"
    record = run_from_config(config, run_dir, progress=False)
    tasks = record["metrics"]["tasks"]
    assert set(tasks) == {"tiny_group", "tiny_mc_a", "tiny_mc_b", "tiny_gen"} == set(record["baseline"]["tasks"])
    assert tasks["tiny_group"]["kind"] == "group" and tasks["tiny_group"]["n"] == 4
    protocol = record["eval_protocol"]["tasks"]["tiny_group"]
    assert (protocol["source"], protocol["num_fewshot"], protocol["apply_chat_template"],
            protocol["fewshot_as_multiturn"], protocol["system_instruction"]) == ("include", 1, False, False, None)
    # paired deltas per task, the generative one on its per-filter exact match
    delta = record["metrics"]["delta"]
    assert set(delta) == {"tiny_group", "tiny_mc_a", "tiny_mc_b", "tiny_gen"} and delta["tiny_mc_a"]["n"] == 2
    # the group's: over its tasks' items, so the size-weighted mean of theirs (equal sizes here)
    assert delta["tiny_group"]["n"] == 4
    assert delta["tiny_group"]["value"] == pytest.approx((delta["tiny_mc_a"]["value"] + delta["tiny_mc_b"]["value"]) / 2)
    assert delta["tiny_group"]["value"] == pytest.approx(tasks["tiny_group"]["acc"] - record["baseline"]["tasks"]["tiny_group"]["acc"])
    assert delta["tiny_gen"]["exact_match,raw"]["n"] == 2
    items = json.loads((run_dir / "zeroshot_items.json").read_text())["rtn W4 g32"]
    assert set(items) == {"tiny_mc_a", "tiny_mc_b", "tiny_gen"}
    # lm-eval's files: the quantized model's, and the baseline's (computed in this run, one set per name)
    files = record["lm_eval_files"]
    assert json.loads((run_dir / files["results"]).read_text())["n-shot"]["tiny_mc_b"] == 1
    assert all((run_dir / path).is_file() for path in files["samples"].values())
    assert set(record["baseline"]["lm_eval_files"]) == {"tiny_group", "tiny_gen"}
    # fp16 changes no weight: the baseline's entries, no evaluation and no files of its own
    fp16 = record["comparisons"][0]
    assert fp16["metrics"]["tasks"]["tiny_group"]["acc"] == record["baseline"]["tasks"]["tiny_group"]["acc"]
    assert "lm_eval_files" not in fp16 and fp16["metrics"]["delta"]["tiny_group"]["value"] == 0.0
    # the table shows the group (not its subtasks) and the generative task's exact match
    table = render(run_rows(record))
    assert "acc tiny_group" in table and "exact_match,raw tiny_gen" in table and "tiny_mc_a" not in table
    flat = fidelity_summary(record)
    assert flat["tasks/tiny_group/acc"] == tasks["tiny_group"]["acc"] and "tasks/tiny_mc_a/stderr" in flat
    assert flat["delta/tiny_gen/exact_match,raw/value"] == delta["tiny_gen"]["exact_match,raw"]["value"]
