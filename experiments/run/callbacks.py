"""Hydra callbacks: a sweep's jobs checked before the first one starts and its index written
after each job and when the multirun ends; a single run's directory noted as new or not, so a
refused run leaves none behind."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

INDEX_FILE = "index.csv"
INDEX_COLUMNS = ["run", "status", "model", "method", "method_options", "bits", "group_size", "avg_bits", "config_hash"]
log = logging.getLogger(__name__)


class SweepIndex(Callback):
    """`<sweep dir>/index.csv`: one row per method entry of every run found under the sweep
    directory (runs resumed from earlier invocations included), with its status and metrics.
    Also checks every job of the sweep before the first one starts (`check_sweep`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep(config)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        # after every job, so that a sweep stopped midway (a failed job, a kill) still has its index
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                write_index(Path(HydraConfig.get().sweep.dir))
        except Exception as error:  # noqa: BLE001 - the index never fails a job
            log.warning("could not write the sweep index: %s", error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        write_index(sweep_dir)
        failed = failed_runs(sweep_dir)
        if failed:
            print(f"quantlab: {len(failed)} run(s) of the sweep failed (see {sweep_dir / INDEX_FILE}):", file=sys.stderr)
            for run, error in failed:
                print(f"  {run}: {error}", file=sys.stderr)
            sys.exit(1)


class RunFolder(Callback):
    """Notes, before Hydra makes a single run's directory, whether it is new: a refused run
    (a config or data error) then removes the directory Hydra made for it (`remove_if_made`),
    and leaves a folder that was there before as it was."""

    made: Path | None = None  # the run directory, when it did not exist before this run

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        RunFolder.made = None if run_dir.exists() else run_dir


def remove_if_made(run_dir: Path) -> bool:
    """Remove `run_dir` with what Hydra wrote there (.hydra/, the job's log) if this run made
    it; True when removed."""
    import shutil

    run_dir = Path(run_dir).absolute()
    if RunFolder.made != run_dir or not run_dir.is_dir():
        return False
    for handler in list(logging.getLogger().handlers):  # Hydra's file handler writes <run>/<job>.log
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            logging.getLogger().removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir)
    RunFolder.made = None
    return True


def write_index(sweep_dir: Path) -> Path | None:
    from quantlab.experiments.records.reporting import load_runs
    from quantlab.experiments.store.cache import atomic_write_bytes

    sweep_dir = Path(sweep_dir).absolute()  # the default output folder is relative
    runs = load_runs([sweep_dir])
    if runs.empty:
        return None
    runs = runs.assign(run=[str(Path(p).absolute().relative_to(sweep_dir)) for p in runs["run_dir"]])
    metrics = [c for c in runs.columns if c.startswith(("ppl_", "baseline_ppl_")) and not c.endswith("_seqlen")]
    path = sweep_dir / INDEX_FILE
    atomic_write_bytes(path, runs[INDEX_COLUMNS + sorted(metrics)].to_csv(index=False).encode())
    return path


def failed_runs(sweep_dir: Path) -> list[tuple[str, str]]:
    """(run directory, error) of every run under the sweep whose record says failed."""
    from quantlab.experiments.records.record import RESULT_FILE, read_result

    out = []
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULT_FILE}")):
        try:
            record = read_result(path.parent)
        except (OSError, ValueError):
            continue
        if record.get("status") != "ok":
            out.append((path.parent.name, str(record.get("error")).splitlines()[0]))
    return out


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override lists of every job of the sweep, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = list(config.hydra.overrides.task)
    params = config.hydra.get("sweeper", {}).get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + arguments
    parser = OverridesParser.create()
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return [list(job) for batch in batches for job in batch]


def check_sweep(config: DictConfig) -> list[tuple[list[str], str]]:
    """Compose and check every job before the first starts. Invalid jobs stop the sweep with the
    full list, unless `+skip_invalid=true`: then the valid jobs run and the invalid ones are
    recorded as failed. Returns the invalid jobs with their messages."""
    from hydra import compose

    from quantlab.experiments.run.cli import check_config, user_error_message
    from quantlab.experiments.run.overrides import composition_message

    try:
        jobs = sweep_jobs(config)
    except Exception as error:  # noqa: BLE001 - a sweeper of another kind: each job checks itself
        log.warning("could not expand the sweep to check its jobs first: %s", error)
        return []
    invalid = []
    config_name = config.hydra.job.get("config_name") or "config"

    def composed(overrides: list[str]) -> DictConfig:
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)

    for job in jobs:
        try:
            cfg = compose(config_name=config_name, overrides=job)
            check_config(cfg, job)
        except Exception as error:  # noqa: BLE001 - each invalid job is listed, with its message
            message = (user_error_message(error) or composition_message(error, job, composed)
                       or f"{type(error).__name__}: {error}")
            invalid.append((job, message.splitlines()[0] if message else type(error).__name__))
    if invalid:
        lines = [f"  {' '.join(job)}: {message}" for job, message in invalid]
        if config.get("skip_invalid"):
            log.warning("%d of %d jobs of the sweep are invalid and will be recorded as failed:\n%s",
                        len(invalid), len(jobs), "\n".join(lines))
        else:
            print(f"quantlab: {len(invalid)} of {len(jobs)} jobs of the sweep are invalid; none was run:",
                  file=sys.stderr)
            print("\n".join(lines), file=sys.stderr)
            print("quantlab: fix them, or pass +skip_invalid=true to run only the valid ones", file=sys.stderr)
            sys.exit(2)
    return invalid
