"""A sweep checks every job before the first starts; `+skip_invalid=true` runs the valid ones; the
index is written even when a job fails, with the default (relative) output folder."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[3]
TINY = [
    "model=tiny-llama", "method=rtn", "group_size=32", "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=32",
    "eval.ppl.max_windows=2",
]


def quantlab_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI run from `cwd` (so the default output folder `outputs` is relative to it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("QUANTLAB_OUTPUT_DIR", None)
    return subprocess.run([sys.executable, "-m", "quantlab.experiments.run.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_skip_invalid_runs_the_valid_jobs_and_the_index_lists_both(tmp_path):
    done = quantlab_in(tmp_path, "-m", *TINY, "bits=9,4", "+skip_invalid=true")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr  # a job failed: the sweep says so, after running the others
    assert "bits=9" in done.stderr and "1 run(s) of the sweep failed" in done.stderr
    index = pd.read_csv(tmp_path / "outputs" / "multiruns" / "sweep" / "index.csv")
    status = dict(zip(index["bits"], index["status"]))
    assert status == {4: "ok", 9: "failed"}, index
    assert index.loc[index["bits"] == 4, "ppl_pydocs"].notna().all()


def test_a_job_failing_at_run_time_does_not_stop_the_others_or_the_index(tmp_path):
    # a vocabulary smaller than the tokenizer's is only seen once the tokenizer loads
    done = quantlab_in(tmp_path, "-m", *TINY, "bits=4", "model.random_config.vocab_size=100,49152")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "model.random_config.vocab_size=100 is smaller than the vocabulary" in done.stderr
    index = pd.read_csv(tmp_path / "outputs" / "multiruns" / "sweep" / "index.csv")
    status = {run.split("vocab_size=")[1].split(",")[0]: s for run, s in zip(index["run"], index["status"])}
    assert status == {"100": "failed", "49152": "ok"}, index
