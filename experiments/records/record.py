"""The run record, `result.json`: one self-describing file per run directory (schema in README).

It is written atomically at the start of a run as `failed` ("did not finish"), then rewritten as
`ok` or `failed` with the error when the run ends, so a crash, an interrupt or even a SIGKILL
leaves a valid record that says the run failed, never a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import resource
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from quantlab.experiments.store.cache import atomic_write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
NOT_FINISHED = "the run did not finish: it was killed, or is still running"
REPO_ROOT = Path(__file__).resolve().parents[2]


def config_hash(config: dict[str, Any]) -> str:
    """Hash of what determines the numbers: the resolved config without paths, logging and what a
    sweeper optimizes (optimized_metric, bits_budget: a search reuses finished runs). `act` and `kv`
    count only when on and `observer` only for static ranges, so weight-only runs keep the
    hash they had before those groups existed (and an unused observer changes nothing)."""
    dropped = {"paths", "logger", "tags", "hydra", "force", "skip_invalid", "sweep_name", "optimized_metric",
               "bits_budget"}
    act = config.get("act") or {}
    if act.get("bits", 16) == 16:
        dropped |= {"act", "observer"}
    elif act.get("mode") != "static":
        dropped.add("observer")
    if (config.get("kv") or {}).get("bits", 16) == 16:
        dropped.add("kv")
    if not config.get("modules"):
        dropped.add("modules")  # no per-module rules: the hash runs had before rules existed
    if not config.get("sensitivity"):
        dropped.add("sensitivity")  # likewise for runs that are not experiment=sensitivity
    if not (config.get("allocation") or {}).get("target_bits"):
        dropped.add("allocation")  # and for runs without a bit budget
    relevant = {k: v for k, v in config.items() if k not in dropped}
    if isinstance(relevant.get("calib"), dict) and "path" in relevant["calib"]:
        # a calibration file's content is in data_fingerprints: moving the file changes nothing
        relevant["calib"] = {k: v for k, v in relevant["calib"].items() if k != "path"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The replicate seeds: `seed` at top level and `calib.seed`. Runs whose configs differ only in these
# repeat one experiment; reports fold them into mean ± sd (experiments/records/reporting/replicates.py).
REPLICATE_SEEDS = ("seed", "calib.seed")


def replicate_hash(config: dict[str, Any]) -> str:
    """`config_hash` of the config with the replicate seeds removed: equal for every replicate of
    one experiment, different as soon as anything else (a knob, a dataset, a size) differs."""
    stripped = {k: v for k, v in config.items() if k != "seed"}
    if isinstance(stripped.get("calib"), dict):
        stripped["calib"] = {k: v for k, v in stripped["calib"].items() if k != "seed"}
    return config_hash(stripped)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("quantlab", "torch", "transformers", "accelerate", "datasets", "hydra-core", "lm-eval", "gguf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def git_commit() -> str | None:
    """The checkout's commit ("-dirty" with uncommitted changes); None for an installed wheel, whose
    folder may sit inside some other project's repository (a .venv in a project)."""
    if not (REPO_ROOT / "setup.py").is_file():
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    run_dir: Path
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.config
        method = cfg.get("method", {})
        self.data = {
            "schema_version": SCHEMA_VERSION,
            "status": "failed",
            "error": NOT_FINISHED,
            "name": cfg.get("name"),
            "started_at": now(),
            "finished_at": None,
            "config": cfg,
            "config_hash": config_hash(cfg),
            "model": {"name": cfg.get("model", {}).get("name"), "fingerprint": None},
            "method": method.get("name"),
            "bits": method.get("bits", cfg.get("bits")),
            "group_size": method.get("group_size", cfg.get("group_size")),
            "calib": None,
            "eval_protocol": {},
            "metrics": {"ppl": {}},
            "baseline": {"ppl": {}},
            "avg_bits": None,
            "model_bytes": None,
            "timings": {},
            "peak_rss_bytes": None,
            "peak_gpu_bytes": None,
            "layers": [],
            "comparisons": [],
            "versions": library_versions(),
            "git_commit": git_commit(),
            "seed": cfg.get("seed"),
            "tags": cfg.get("tags", []),
        }

    @property
    def path(self) -> Path:
        return self.run_dir / RESULT_FILE

    def write(self) -> None:
        self.data["peak_rss_bytes"] = peak_rss_bytes()
        try:
            import torch

            if torch.cuda.is_available():
                self.data["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        except ImportError:
            pass
        atomic_write_json(self.path, self.data)

    def finish_ok(self) -> None:
        self.data.update(status="ok", error=None, finished_at=now())
        self.write()
        log.info("record written: %s (status ok)", self.path)

    def finish_failed(self, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        self.data.update(
            status="failed", error=message, traceback="".join(traceback.format_exception(error)), finished_at=now()
        )
        self.write()
        log.info("record written: %s (status failed)", self.path)


def read_result(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RESULT_FILE).read_text())


def finished_record(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The run directory's record if it finished ok for this very configuration, else None:
    what makes a re-run sweep skip the work it already did (failed or missing runs are redone)."""
    try:
        record = read_result(run_dir)
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("status") == "ok" and record.get("config_hash") == config_hash(config):
        return record
    return None
