"""Search (`hparams_search=`): what a run returns to Hydra's sweepers, the bits budget as +inf, and
tiny Optuna searches on tiny-llama whose optimization_results.yaml holds the runs' own values."""

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from quantlab.experiments.run.cli import load_group_option
from quantlab.experiments.run.objective import check_objectives, missing_search_plugin, objective, over_budget
from quantlab.experiments.run.schema import validate
from quantlab.methods.base import ConfigError
from tests.conftest import CONF_DIR, compose_config, run_quantlab
from tests.experiments.records.reporting.test_report_records import make_record
from tests.experiments.store.test_shared_inputs import private_cache

PLUGIN = "hydra_plugins.hydra_optuna_sweeper"
TINY = ["model=tiny-llama", "method=rtn", "calib=pydocs", "calib.nsamples=4", "calib.seqlen=64",
        "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=6", "optimized_metric=ppl:pydocs"]


def record(bits=3, group_size=128, ppl=12.0):
    """A finished record: avg_bits = bits + 20 / group_size, its ppl on wikitext2 and c4 (+2)."""
    return make_record("gptq", bits=bits, group_size=group_size, ppl={"wikitext2": ppl, "c4": ppl + 2})


def test_the_objective_is_the_named_metric_of_the_main_method():
    rec = record(ppl=12.0)
    assert objective(rec) == 12.0  # null: the first perplexity, as before
    assert objective(rec, "ppl:c4") == 14.0
    assert objective(rec, "ppl_ratio:wikitext2") == pytest.approx(12.0 / 10.0)  # the baseline is 10
    assert objective(rec, ["ppl:wikitext2", "avg_bits"]) == (12.0, pytest.approx(3 + 20 / 128))
    assert objective(rec, ["avg_bits"]) == pytest.approx(3 + 20 / 128)  # one direction: a float
    assert objective(rec, OmegaConf.create(["ppl:c4", "avg_bits"])) == (14.0, pytest.approx(3 + 20 / 128))
    assert objective(rec, "ppl:ptb") is None  # not measured: the sweeper counts a failed trial


def test_the_budget_rule_turns_over_budget_runs_into_inf():
    within, over = record(bits=3, group_size=128), record(bits=3, group_size=32)  # 3.156 and 3.625 bits
    assert objective(within, "ppl:wikitext2", budget=3.3) == 12.0
    assert objective(over, "ppl:wikitext2", budget=3.3) == math.inf
    assert objective(over, ["ppl:wikitext2", "avg_bits"], budget=3.3) == (math.inf, math.inf)
    assert objective(over, "ppl:wikitext2", budget=None) == 12.0  # no budget, no rule
    assert not over_budget(3.25, 3.25) and over_budget(3.2500001, 3.25)  # the budget itself is allowed
    assert not over_budget(None, 3.25)  # a run without bits per weight is not judged


def test_objectives_and_budgets_are_checked_before_the_run():
    resolved = OmegaConf.to_container(compose_config("optimized_metric=ppl:wikitext2", "bits_budget=3.3"))
    check_objectives(resolved)
    with pytest.raises(ConfigError, match=r"'ppl:c4', which this run does not measure; valid: ppl:wikitext2"):
        check_objectives({**resolved, "optimized_metric": "ppl:c4"})
    with pytest.raises(ConfigError, match="valid: .*avg_bits"):
        check_objectives({**resolved, "optimized_metric": ["ppl:wikitext2", "bits_per_weight"]})
    with pytest.raises(ConfigError, match="bits_budget=-1 must be a positive number"):
        check_objectives({**resolved, "bits_budget": -1})
    with pytest.raises(ConfigError, match="must be a name or a list of names"):
        check_objectives({**resolved, "optimized_metric": 3})
    # the run's own validation refuses them, before any model loads
    with pytest.raises(ConfigError, match="'ppl:c4', which this run does not measure"):
        validate(compose_config("optimized_metric=ppl:c4"), load_group_option)


def test_the_search_configs_compose_with_their_objectives():
    pytest.importorskip(PLUGIN, reason="hydra-optuna-sweeper (the `search` extra)")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        budget = compose(config_name="config", overrides=["hparams_search=ppl_under_budget"], return_hydra_config=True)
        pareto = compose(config_name="config", overrides=["hparams_search=ppl_vs_bits_nsga2"], return_hydra_config=True)
    assert budget.hydra.sweeper.direction == "minimize" and budget.bits_budget == 3.3
    assert budget.hydra.sweeper.sampler._target_.endswith("TPESampler")
    assert list(pareto.hydra.sweeper.direction) == ["minimize", "minimize"]
    assert list(pareto.optimized_metric) == ["ppl:wikitext2", "avg_bits"]
    assert pareto.hydra.sweeper.sampler._target_.endswith("NSGAIISampler")
    for cfg in (budget, pareto):  # the objectives name what the run measures
        check_objectives(OmegaConf.to_container(cfg))


def test_a_missing_plugin_is_named_with_its_install_line(monkeypatch):
    import importlib.util

    assert missing_search_plugin(["method=rtn"]) is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == PLUGIN else real(name))
    assert "pip install -e '.[search]'" in missing_search_plugin(["hparams_search=ppl_under_budget"])


def search(tmp_path: Path, *overrides: str) -> tuple[dict, list[dict]]:
    """A tiny Optuna search on tiny-llama (-m: search-space overrides on the command line need it):
    optimization_results.yaml and every trial's record."""
    pytest.importorskip(PLUGIN, reason="hydra-optuna-sweeper (the `search` extra)")
    done = run_quantlab("-m", *TINY, *overrides, f"paths.cache_dir={private_cache(tmp_path)}", "sweep_name=search",
                        QUANTLAB_OUTPUT_DIR=str(tmp_path / "out"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "out" / "multiruns" / "search"
    results = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert records and all(r["status"] == "ok" for r in records)
    return results, records


def test_a_budgeted_search_never_picks_a_run_over_the_budget(tmp_path):
    # two points, W3 g32 (3.625 bits, over 3.3) and W3 per channel (3.25); the config's seeded TPE
    # draws both in its first trials (optuna 2.x, pinned by the plugin, draws the same on every machine)
    results, records = search(tmp_path, "hparams_search=ppl_under_budget", "bits=choice(3)",
                              "group_size=choice(32,-1)", "bits_budget=3.3", "hydra.sweeper.n_trials=3")
    by_group = {r["group_size"]: r for r in records}
    assert sorted(by_group) == [-1, 32] and by_group[32]["avg_bits"] > 3.3 >= by_group[-1]["avg_bits"]
    ppl = {g: r["metrics"]["ppl"]["pydocs"]["value"] for g, r in by_group.items()}
    assert ppl[32] < ppl[-1]  # the finer groups are better, so only the budget can rule them out
    assert results["best_params"] == {"bits": 3, "group_size": -1}
    assert results["best_value"] == pytest.approx(ppl[-1])


def test_an_nsga2_search_returns_perplexity_and_bits(tmp_path):
    results, records = search(tmp_path, "hparams_search=ppl_vs_bits_nsga2", "optimized_metric=[ppl:pydocs,avg_bits]",
                              "bits=choice(2,3)", "group_size=choice(32,-1)", "hydra.sweeper.n_trials=2")
    measured = {(r["bits"], r["group_size"]): [r["metrics"]["ppl"]["pydocs"]["value"], r["avg_bits"]] for r in records}
    assert results["solutions"]
    for solution in results["solutions"]:  # the Pareto front holds the runs' own (ppl, bits)
        params = solution["params"]
        assert solution["values"] == pytest.approx(measured[(params["bits"], params["group_size"])])
