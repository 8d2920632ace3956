"""Sweeps through Hydra launchers: joblib workers on one machine share every cache entry (each
computed once), submitit runs jobs in subprocesses (the SLURM path, tested locally) and the report
aggregates them, and the shipped SLURM example composes."""

import json
import os
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np

from quantlab.experiments.records.reporting import load_runs, pareto_plot, parse_metric
from quantlab.experiments.records.reporting.cli import main as report_main
from quantlab.experiments.records.reporting.plots import BITS_AXIS_LABEL
from quantlab.experiments.store.cache import computations, read_events
from tests.conftest import run_quantlab
from tests.experiments.store.test_shared_inputs import kinds, private_cache

REPO = Path(__file__).resolve().parents[3]
TINY_SWEEP = [
    "model=tiny-llama",
    "group_size=32",
    "calib=pydocs",
    "calib.nsamples=4",
    "calib.seqlen=64",
    "eval.ppl.datasets=[pydocs]",
    "eval.ppl.seqlen=64",
    "eval.ppl.max_windows=6",
]


def quantlab(
    tmp_path: Path, cache: Path, *overrides: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    done = run_quantlab(
        "-m", *TINY_SWEEP, *overrides, f"paths.cache_dir={cache}", timeout=timeout,
        QUANTLAB_OUTPUT_DIR=str(tmp_path / "out"), WANDB_DIR=str(tmp_path / "wandb-home"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def results(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/result.json")}


def test_joblib_workers_compute_each_shared_entry_once(tmp_path):
    cache = private_cache(tmp_path)
    quantlab(
        tmp_path,
        cache,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "method=gptq",
        "bits=3,4",
        "calib.seed=0,1",
        "sweep_name=joblib",
    )
    runs = results(tmp_path / "out" / "multiruns" / "joblib")
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs.values())
    events = [e for e in read_events(cache) if e["kind"] != "models"]
    assert len({e["pid"] for e in events}) == 2, "two worker processes ran the four jobs"
    # one model, one eval set, one baseline; two calibration sets (two seeds), each with its block-0 inputs
    assert set(computations(cache).values()) == {1}, computations(cache)
    assert kinds(cache) == {"eval_windows": 1, "baseline": 1, "calibration": 2, "block_inputs": 2}
    # GGUF conversion (for the borrowed tokenizer) happened at most once, in the shared model cache
    assert all(n == 1 for (kind, _), n in computations(cache).items() if kind == "models")
    baselines = {r["baseline"]["ppl"]["pydocs"]["value"] for r in runs.values()}
    assert len(baselines) == 1
    assert len({r["metrics"]["ppl"]["pydocs"]["value"] for r in runs.values()}) == 4
    assert (tmp_path / "out" / "multiruns" / "joblib" / "index.csv").is_file()


def test_submitit_local_sweep_runs_in_subprocesses_and_is_reported(tmp_path, capsys):
    cache = private_cache(tmp_path)
    quantlab(
        tmp_path,
        cache,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "method=rtn",
        "bits=3,4",
        "logger=wandb",
        "sweep_name=submitit",
    )
    sweep = tmp_path / "out" / "multiruns" / "submitit"
    runs = results(sweep)
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs.values())
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2, (
        "each job ran as its own submitit process"
    )
    pids = {e["pid"] for e in read_events(cache)}
    assert len(pids) == 2 and os.getpid() not in pids
    for name, record in runs.items():  # wandb: one offline run per job, grouped by the sweep
        assert record["config"]["logger"]["group"] == "submitit"
        assert len(list((sweep / name / "wandb").glob("offline-run-*"))) == 1

    assert report_main([str(sweep)]) == 0  # quantlab-report
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert "W3 ppl" in lines[0] and "W4 ppl" in lines[0], lines
    assert sum("rtn" in line for line in lines) == 1 and sum("fp16" in line for line in lines) == 1, lines
    png = tmp_path / "pareto.png"
    assert report_main([str(sweep), "--plot", "pareto", str(png)]) == 0
    image = matplotlib.image.imread(png)  # raises unless it is a real PNG
    assert image.shape[0] > 200 and image.shape[1] > 200 and np.ptp(image[..., :3]) > 0.5
    selected = load_runs([sweep])
    figure = pareto_plot(selected, parse_metric(None, selected))
    ax = figure.axes[0]
    assert ax.get_xlabel() == BITS_AXIS_LABEL and "perplexity" in ax.get_ylabel()
    assert len(ax.get_lines()) >= 1 and ax.get_title()


def test_slurm_example_selects_the_submitit_slurm_launcher():
    from hydra import compose, initialize_config_dir

    from quantlab.experiments.run.cli import CONF_DIR

    example = CONF_DIR / "local" / "slurm.example.yaml"
    assert example.is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(example)], cwd=REPO)
    assert ignored.returncode == 1, "the example is tracked; conf/local/default.yaml stays untracked"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["local=slurm.example"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.partition
