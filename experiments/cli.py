"""`quantlab`: the Hydra app. One run, or a sweep with -m. See README for the config groups."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Sweep run directories are named by their overrides; `experiment=smollm2/gptq_vs_rtn` must not
# become two nested directories. Registered at import, so launcher workers (joblib, submitit)
# that unpickle this module's task function have it too.
OmegaConf.register_new_resolver("path_safe", lambda text: str(text).replace("/", "-"), replace=True)
log = logging.getLogger("quantlab")


class Interrupted(BaseException):
    """The process was asked to stop (SIGTERM): recorded as a failed run."""


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


def load_group_option(group: str, name: str) -> DictConfig:
    """One option of a config group, read directly (not through the defaults list)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        from methods.base import ConfigError

        valid = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"{name!r} names no option of config group {group!r}; valid: {', '.join(valid)}")
    return OmegaConf.load(path)


def run_from_config(cfg: DictConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Validate, then execute; a config error still leaves a failed record in the run directory.
    A run directory that already holds an ok record of the same configuration is not run again
    (re-running a sweep resumes it) unless the config says `force: true`."""
    from experiments.results import RunRecord, finished_record
    from experiments.run import execute
    from experiments.schema import validate

    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    done = None if container.get("force") else finished_record(run_dir, container)
    if done is not None:
        log.info("%s already holds a finished run of this config: skipped (+force=true redoes it)", run_dir)
        return {**done, "skipped": True}
    try:
        run = validate(cfg, load_group_option)
    except Exception as error:
        RunRecord(run_dir, container).finish_failed(error)
        raise
    return execute(run, container, run_dir, progress=progress)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> float | None:
    from hydra.types import RunMode

    from experiments.summary import expected_line, protocol_line, reduced_protocol_note, render, run_rows
    from experiments.tracking import group_by_sweep
    from methods.base import ConfigError

    signal.signal(signal.SIGTERM, _raise_interrupted)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        group_by_sweep(cfg)
    try:
        record = run_from_config(cfg, run_dir)
    except ConfigError as error:
        print(f"quantlab: config error: {error}", file=sys.stderr)
        print(f"quantlab: a failed record was written to {run_dir / 'result.json'}", file=sys.stderr)
        sys.exit(2)
    print()
    if record.get("skipped"):
        print(f"skipped: {run_dir} already holds a finished run of this config (+force=true redoes it)")
    print(render(run_rows(record)))
    print(f"protocol: {protocol_line(record)}")
    for line in (reduced_protocol_note(record), expected_line(record)):
        if line:
            print(line)
    print(f"result: {run_dir / 'result.json'}")
    values = [m["value"] for m in record["metrics"]["ppl"].values()]
    return values[0] if values else None  # the first perplexity, for Hydra sweepers that optimize


def main() -> None:
    app()


if __name__ == "__main__":
    main()
