"""Re-running a sweep resumes it: finished runs of the same config are skipped, killed and missing
ones are redone, and the report lists every run once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from quantlab.experiments.records.reporting import load_runs

REPO = Path(__file__).resolve().parents[3]
SWEEP = [
    "-m", "model=tiny-llama", "method=rtn", "bits=3,4", "group_size=32,64", "eval.ppl.datasets=[pydocs]",
    "eval.ppl.seqlen=64", "eval.ppl.max_windows=400",
]


def sweep(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", QUANTLAB_OUTPUT_DIR=str(tmp_path / "out"))
    return subprocess.Popen(
        [sys.executable, "-m", "quantlab.experiments.run.cli", *SWEEP, *extra, f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def records(tmp_path: Path) -> dict[str, dict]:
    found = {}
    root = tmp_path / "out" / "multiruns" / "sweep"
    for path in root.rglob("result.json"):
        try:
            found[str(path.parent.relative_to(root))] = json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return found


def test_a_killed_sweep_resumes_with_only_the_missing_runs(tmp_path):
    first = sweep(tmp_path)
    deadline = time.time() + 300
    while True:  # kill the sweep while its third run is going
        done = records(tmp_path)
        if len(done) == 3 and sum(r["status"] == "ok" for r in done.values()) == 2:
            break
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    before = records(tmp_path)
    finished = {name: r["started_at"] for name, r in before.items() if r["status"] == "ok"}
    assert len(before) == 3 and len(finished) == 2

    second = sweep(tmp_path)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    after = records(tmp_path)
    assert len(after) == 4 and all(r["status"] == "ok" for r in after.values())
    for name, started in finished.items():
        assert after[name]["started_at"] == started, f"{name} was run again"
    assert out.count("skipped:") == 2
    assert sorted(r["config"]["group_size"] for r in after.values()) == [32, 32, 64, 64]
    # run directories are named by their overrides (paths excluded: they do not change results)
    common = "eval.ppl.datasets=[pydocs],eval.ppl.max_windows=400,eval.ppl.seqlen=64"
    assert sorted(after) == sorted(
        f"bits={b},{common},group_size={g},method=rtn,model=tiny-llama" for b in (3, 4) for g in (32, 64)
    )
    runs = load_runs([tmp_path / "out"])
    assert len(runs) == 4 and runs["config_hash"].is_unique
    # the sweep-level index lists every run once, resumed ones included
    index = pd.read_csv(tmp_path / "out" / "multiruns" / "sweep" / "index.csv")
    assert sorted(index["run"]) == sorted(after) and set(index["status"]) == {"ok"}
    assert index["ppl_pydocs"].notna().all()


def test_force_redoes_finished_runs(tmp_path):
    env_sweep = ["bits=4", "group_size=32"]
    first = sweep(tmp_path, *env_sweep)
    assert first.wait(timeout=300) == 0
    started = {n: r["started_at"] for n, r in records(tmp_path).items()}
    time.sleep(1.1)  # started_at has one-second resolution
    forced = sweep(tmp_path, *env_sweep, "+force=true")
    out, err = forced.communicate(timeout=300)
    assert forced.returncode == 0, err
    assert "skipped:" not in out
    assert {n: r["started_at"] for n, r in records(tmp_path).items()} != started
    assert set(records(tmp_path)) == set(started), "+force=true reruns in the same directories"
