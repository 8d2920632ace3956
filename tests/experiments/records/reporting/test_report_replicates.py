"""Replicates over seed / calib.seed: folded into mean ± sample sd with per-seed values, and paired
seed by seed in `--versus` with a pooled interval over the shared windows."""

import io
import math
import statistics

import pandas as pd
import pytest
from scipy import stats

from quantlab.experiments.records.record import replicate_hash
from quantlab.experiments.records.reporting.cli import main as report_main
from quantlab.experiments.records.reporting.metrics import parse_metric
from quantlab.experiments.records.reporting.records import ReportError, load_runs
from quantlab.experiments.records.reporting.replicates import combine_replicates
from quantlab.experiments.records.reporting.tables import pivot
from quantlab.experiments.records.reporting.versus import format_versus, versus_table
from quantlab.experiments.store.cache import atomic_write_json
from tests.experiments.records.reporting.test_report_records import make_record, write_run

SEED_PPL = {0: 12.0, 1: 13.0, 2: 15.0}


@pytest.fixture
def seeds(tmp_path):
    """GPTQ W3 over three seeds (finished in seed order), and a W4 run that stands alone."""
    for seed, ppl in SEED_PPL.items():
        write_run(tmp_path, f"w3-seed{seed}", method="gptq", bits=3, seed=seed, ppl={"wikitext2": ppl},
                  finished_at=f"2026-01-0{seed + 1}T10:00:00+00:00")
    write_run(tmp_path, "w4", method="gptq", bits=4, ppl={"wikitext2": 11.0})
    return tmp_path


def test_the_replicate_hash_ignores_only_the_two_seeds():
    config = make_record()["config"]
    reseeded = {**config, "seed": 7, "calib": {**config["calib"], "seed": 3}}
    assert replicate_hash(reseeded) == replicate_hash(config)
    assert replicate_hash({**config, "calib": {**config["calib"], "nsamples": 64}}) != replicate_hash(config)
    assert replicate_hash({**config, "bits": 3}) != replicate_hash(config)


def test_replicates_fold_into_mean_sample_sd_and_per_seed_values(seeds):
    combined = combine_replicates(load_runs([seeds]))
    assert len(combined) == 2
    w3 = combined[combined["bits"].eq(3)].iloc[0]
    values = list(SEED_PPL.values())
    assert w3["replicates"] == 3
    assert w3["ppl_wikitext2"] == pytest.approx(statistics.mean(values))
    assert w3["ppl_wikitext2_sd"] == pytest.approx(statistics.stdev(values))  # n - 1
    assert w3["ppl_wikitext2_per_seed"] == "seed=0:12;seed=1:13;seed=2:15"
    assert pd.isna(w3["ppl_wikitext2_ci_low"])  # one run's window interval no longer describes the mean
    # the paired ratio to fp16 is averaged too (each seed's is its ppl / 10)
    assert w3["ppl_ratio_wikitext2"] == pytest.approx(statistics.mean(values) / 10)
    assert pd.isna(w3["seed"]) and w3["calib_seed"] == 0  # only the seed that varies is blanked
    alone = combined[combined["bits"].eq(4)].iloc[0]
    assert alone["replicates"] == 1 and alone["ppl_wikitext2_ci_low"] == 10.5


def test_calib_seed_replicates_are_labelled_by_it_and_other_knobs_stay_apart(tmp_path):
    for calib_seed, ppl in ((0, 20.0), (1, 22.0)):
        write_run(tmp_path, f"c{calib_seed}", method="gptq", bits=3, calib_seed=calib_seed, ppl={"wikitext2": ppl})
    write_run(tmp_path, "n64", method="gptq", bits=3, calib_nsamples=64, ppl={"wikitext2": 30.0})
    combined = combine_replicates(load_runs([tmp_path]))
    folded = combined[combined["replicates"].gt(1)].iloc[0]
    assert folded["ppl_wikitext2_per_seed"] == "calib_seed=0:20;calib_seed=1:22"
    assert folded["ppl_wikitext2_sd"] == pytest.approx(math.sqrt(2))
    assert sorted(combined["ppl_wikitext2"]) == [21.0, 30.0]  # 64 calibration samples: another experiment


def test_failed_replicates_are_not_folded(tmp_path):
    write_run(tmp_path, "a", method="gptq", bits=3, seed=0, ppl={"wikitext2": 12.0})
    write_run(tmp_path, "b", method="gptq", bits=3, seed=1, status="failed")
    combined = combine_replicates(load_runs([tmp_path]))
    assert list(combined["replicates"]) == [1, 1]


def test_the_pivot_cell_shows_mean_sd_n_and_csv_lists_the_seeds(seeds):
    runs = combine_replicates(load_runs([seeds]))
    table = pivot(runs, parse_metric("ppl:wikitext2", runs))
    expected = f"{statistics.mean(SEED_PPL.values()):.2f} ± {statistics.stdev(SEED_PPL.values()):.2f} (n=3)"
    assert table.frame.loc[("tiny-llama", "gptq", "128"), ("W3", "ppl")] == expected
    assert table.frame.loc[("tiny-llama", "gptq", "128"), ("W4", "ppl")] == "11.00 ± 0.50"
    assert "W3 per seed" not in table.render("markdown") and any("sample sd" in note for note in table.notes)
    parsed = pd.read_csv(io.StringIO(table.render("csv"))).set_index("method")
    assert parsed.loc["gptq", "W3 per seed"] == "seed=0:12;seed=1:13;seed=2:15"


def test_the_cli_folds_by_default_and_latest_keeps_the_old_behaviour(seeds, capsys):
    assert report_main([str(seeds), "--format", "csv"]) == 0
    folded = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("method")
    assert folded.loc["gptq", "W3 ppl"].endswith("(n=3)")
    assert report_main([str(seeds), "--format", "csv", "--replicates", "latest"]) == 0
    out, err = capsys.readouterr()
    assert pd.read_csv(io.StringIO(out)).set_index("method").loc["gptq", "W3 ppl"] == "15.00 ± 0.50"
    assert "fold seeds with --replicates mean" in err
    assert report_main([str(seeds), "--flat", "--format", "csv"]) == 0
    flat = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert sorted(flat["replicates"]) == [1, 3] and "ppl_wikitext2_per_seed" in flat.columns
    with pytest.raises(ReportError, match="--replicates 'median'"):
        combine_replicates(load_runs([seeds]), "median")


# Per-seed window NLLs of SliM-LLM and of GPTQ beside it, on the same four windows.
OURS = {0: [2.0, 2.5, 3.1, 2.2], 1: [2.1, 2.4, 3.0, 2.3], 2: [1.9, 2.6, 3.3, 2.1]}
GPTQ = {0: [2.1, 2.7, 3.2, 2.5], 1: [2.2, 2.6, 3.1, 2.4], 2: [2.0, 2.9, 3.2, 2.4]}


@pytest.fixture
def paired_seeds(tmp_path):
    for seed in OURS:
        record = make_record("slim_llm", bits=2, group_size=128, seed=seed, ppl={"wikitext2": 30.0 + seed},
                             comparisons=[("gptq", {"wikitext2": 40.0 + seed})])
        for entry, nll in ((record, OURS[seed]), (record["comparisons"][0], GPTQ[seed])):
            entry["metrics"]["ppl"]["wikitext2"].update(window_nll=nll, n_windows=len(nll))
        atomic_write_json(tmp_path / f"seed{seed}" / "result.json", record)
    return tmp_path


def test_versus_pairs_seed_by_seed_and_pools_over_the_shared_windows(paired_seeds):
    [row] = versus_table(load_runs([paired_seeds]), "gptq", "wikitext2").to_dict("records")
    per_seed = {s: math.exp(statistics.mean(a - b for a, b in zip(OURS[s], GPTQ[s]))) for s in OURS}
    assert row["replicates"] == 3
    assert row["seed_ratios"] == ";".join(f"seed={s}:{r:.6g}" for s, r in per_seed.items())
    assert row["ratio_seed_sd"] == pytest.approx(statistics.stdev(per_seed.values()))
    # the pooled ratio is the geometric mean of the per-seed ratios ...
    assert row["ppl_ratio"] == pytest.approx(math.exp(statistics.mean(math.log(r) for r in per_seed.values())))
    # ... with a t interval over the windows of the seed-averaged differences
    window_diffs = [statistics.mean(OURS[s][w] - GPTQ[s][w] for s in OURS) for w in range(4)]
    half = stats.t.ppf(0.975, 3) * statistics.stdev(window_diffs) / 2
    assert row["ratio_ci_low"] == pytest.approx(math.exp(statistics.mean(window_diffs) - half))
    assert row["ratio_ci_high"] == pytest.approx(math.exp(statistics.mean(window_diffs) + half))
    assert row["ppl_wikitext2"] == pytest.approx(31.0) and row["reference_ppl_wikitext2"] == pytest.approx(41.0)
    shown = format_versus(pd.DataFrame([row]), "wikitext2", 2)
    assert shown.loc[0, "seeds"] == 3 and shown.loc[0, "per-seed ratios"].startswith("seed=0:")


def test_versus_latest_pairs_every_seed_alone(paired_seeds):
    table = versus_table(load_runs([paired_seeds]), "gptq", "wikitext2", replicates="latest")
    assert len(table) == 3 and set(table["replicates"]) == {1}
    assert sorted(table["ppl_ratio"]) == pytest.approx(sorted(
        math.exp(statistics.mean(a - b for a, b in zip(OURS[s], GPTQ[s]))) for s in OURS))
