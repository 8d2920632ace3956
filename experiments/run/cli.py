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

# quantlab's own config groups: conf/ at the repository root, shipped in a wheel as quantlab/conf,
# beside quantlab/experiments, so the same relative path finds both.
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Sweep run directories are named by their overrides; `experiment=smollm2/gptq_vs_rtn` must not
# become two nested directories. Registered at import, so launcher workers (joblib, submitit)
# that unpickle this module's task function have it too.
OmegaConf.register_new_resolver("path_safe", lambda text: str(text).replace("/", "-"), replace=True)


def _path_part(text: Any) -> str:
    """`name` and `sweep_name` as one directory name that stays inside the output folder: no
    separators, no '..'. (Such names are refused before the run starts; this keeps even the
    directory Hydra makes before that inside.)"""
    part = str(text).replace("/", "-").replace("\\", "-").replace("\0", "")
    return "_" if part.strip(".") == "" else part


OmegaConf.register_new_resolver("path_part", _path_part, replace=True)
log = logging.getLogger("quantlab")


class Interrupted(BaseException):
    """The process was asked to stop (SIGTERM): recorded as a failed run."""


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(f"received signal {signal.Signals(signum).name}")


def config_search_path() -> Any:
    """Hydra's config search path in effect: a running Hydra app's (its --config-dir,
    --config-path and hydra.searchpath included), else the one of an open
    `initialize_config_dir` / `initialize` block, else the one `quantlab` starts with."""
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    try:
        sources = [(s.provider, f"{s.schema}://{s.path}") for s in HydraConfig.get().runtime.config_sources]
    except ValueError:  # not inside a Hydra app
        if not GlobalHydra.instance().is_initialized():
            return create_config_search_path(str(CONF_DIR))
        sources = [(s.provider, f"{s.scheme()}://{s.path}") for s in GlobalHydra.instance().config_loader().get_sources()]
    search_path = ConfigSearchPathImpl()
    for provider, path in sources:
        search_path.append(provider, path)
    return search_path


def load_group_option(group: str, name: str) -> DictConfig:
    """One option of a config group as Hydra finds it on the search path (a user's config dir
    may add or shadow options), read as written: not composed into the run's config, so its
    interpolations (`${bits}`) resolve against the run that borrows it."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra.core.plugins import Plugins

    Plugins.instance()  # registers the config source types (file://, pkg://) the repository reads
    repository = ConfigRepository(config_search_path())
    found = repository.load_config(f"{group}/{name}")
    if found is None:
        from quantlab.experiments.run.checks import closest
        from quantlab.methods.base import ConfigError

        valid = repository.get_group_options(group)
        hint = f" (did you mean {match!r}?)" if (match := closest(name, valid)) else ""
        raise ConfigError(
            f"{name!r} names no option of config group {group!r}{hint}; valid: {', '.join(valid) or '(none)'} "
            "(a config dir of your own adds options: --config-dir DIR or hydra.searchpath=[file://DIR])"
        )
    return OmegaConf.create(OmegaConf.to_container(found.config))


def _task_overrides() -> list[str] | None:
    """The command line's overrides of this job, when Hydra runs it."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (a test, a notebook)
        return None


def check_config(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[Any, dict[str, str]]:
    """Everything checked before a model loads: the typed groups (schema.validate), the rest of
    the config (experiments/run/checks.py) and every data file the run reads (experiments/run/preflight.py).
    Returns the validated RunConfig and the content fingerprints of its data."""
    from quantlab.experiments.run.checks import check_run
    from quantlab.experiments.run.flow import data_dir_from_config
    from quantlab.experiments.run.preflight import check_data
    from quantlab.experiments.run.schema import validate

    run = validate(cfg, load_group_option)
    check_run(run, overrides)
    with data_dir_from_config(run):
        data = check_data(run)
    return run, data


def run_from_config(
    cfg: DictConfig, run_dir: Path, progress: bool = True, overrides: list[str] | None = None,
    record_refusal: bool = False,
) -> dict[str, Any]:
    """Validate, then execute. A refused config (a config or data error) writes nothing, unless
    `record_refusal` (a sweep's job: its index lists it as failed). A run that fails after it
    started leaves a failed record. A run directory that already holds an ok record of the same
    configuration and the same data (content fingerprints, not paths) is not run again
    (re-running a sweep resumes it) unless the config says `force: true`."""
    from quantlab.experiments.records.record import RunRecord, finished_record, read_result
    from quantlab.experiments.run.flow import execute

    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    try:
        run, data = check_config(cfg, _task_overrides() if overrides is None else overrides)
    except Exception as error:
        try:  # a rerun with a broken setup (a moved data folder) must not erase a finished result
            finished = read_result(run_dir).get("status") == "ok"
        except (OSError, ValueError):
            finished = False
        if record_refusal and not finished:
            RunRecord(run_dir, container).finish_failed(error)
        raise
    container["data_fingerprints"] = data  # part of the config hash: resume is keyed by the data's content
    done = None if container.get("force") else finished_record(run_dir, container)
    if done is not None:
        log.info("%s already holds a finished run of this config: skipped (+force=true redoes it)", run_dir)
        return {**done, "skipped": True}
    return execute(run, container, run_dir, progress=progress)


def user_error_message(error: BaseException) -> str | None:
    """The message of an error the user can fix (a config, a file, a missing model, a directory
    that cannot be written), printed without a traceback; None for anything else."""
    import errno

    from quantlab.experiments.data.calibration import CalibrationDataUnavailable
    from quantlab.experiments.data.custom import CalibrationTextError
    from quantlab.experiments.data.sources import DatasetNotFound, TextTooShort
    from quantlab.experiments.models.adapters import UnsupportedArchitecture
    from quantlab.experiments.models.loading import ModelNotAvailable
    from quantlab.methods.base import ConfigError

    if isinstance(error, (ConfigError, ModelNotAvailable, DatasetNotFound, CalibrationDataUnavailable,
                          UnsupportedArchitecture, TextTooShort, CalibrationTextError)):
        return str(error)
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                                      errno.EDQUOT):
        where = f" {error.filename}" if error.filename else ""
        return (f"cannot write{where}: {error.strerror}; choose a writable folder with enough space "
                "(paths.output_dir / QUANTLAB_OUTPUT_DIR, paths.cache_dir / QUANTLAB_CACHE_DIR)")
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg: DictConfig) -> float | tuple[float, ...] | None:
    from hydra.types import RunMode

    from quantlab.experiments.records.reporting.text import (
        expected_line,
        protocol_line,
        reduced_protocol_note,
        render,
        run_rows,
    )
    from quantlab.experiments.records.tracking import group_by_sweep
    from quantlab.experiments.run.callbacks import remove_if_made
    from quantlab.experiments.run.objective import objective
    from quantlab.methods.base import ConfigError

    signal.signal(signal.SIGTERM, _raise_interrupted)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    if sweep:
        group_by_sweep(cfg)
    try:
        # progress bars on a terminal only: in a pipe or a log file the stage lines say it, and a
        # bar's hundreds of updates could fill a pipe nobody reads yet
        record = run_from_config(cfg, run_dir, progress=sys.stderr.isatty(), record_refusal=sweep)
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise  # a bug: its traceback is what helps
        from quantlab.experiments.run.preflight import DataError

        kind = "error"
        if isinstance(error, ConfigError):
            kind = "data error" if isinstance(error, DataError) else "config error"
        print(f"quantlab: {kind}: {message}", file=sys.stderr)
        if not sweep and not (run_dir / "result.json").is_file():  # refused before it started
            remove_if_made(run_dir)  # no run directory left behind
        if (run_dir / "result.json").is_file():
            print(f"quantlab: the run's record is {run_dir / 'result.json'}", file=sys.stderr)
        if sweep:  # the sweep's other jobs still run; its index lists this one as failed
            return None
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    print()
    if record.get("sensitivity"):
        _print_sensitivity(record["sensitivity"], run_dir)
        return None
    if record.get("skipped"):
        print(f"skipped: {run_dir} already holds a finished run of this config (+force=true redoes it)")
    print(render(run_rows(record)))
    print(f"protocol: {protocol_line(record)}")
    for line in (reduced_protocol_note(record), expected_line(record)):
        if line:
            print(line)
    print(f"result: {run_dir / 'result.json'}")
    # what Hydra's sweepers optimize (optimized_metric; +inf over bits_budget): experiments/run/objective.py
    return objective(record, cfg.get("optimized_metric"), cfg.get("bits_budget"))


def _print_sensitivity(record: dict[str, Any], run_dir: Path) -> None:
    """The end of an experiment=sensitivity run: the proxies ranked at the middle width measured."""
    from quantlab.experiments.records.reporting import sensitivity
    from quantlab.experiments.records.reporting.tables import render_flat
    from quantlab.experiments.records.sensitivity_record import SENSITIVITY_FILE

    bits = record["bits"][len(record["bits"]) // 2]
    print(sensitivity.title(record, bits))
    print(render_flat(sensitivity.proxy_ranking(record, bits).round(4), "markdown"))
    print(f"record: {run_dir / SENSITIVITY_FILE} (quantlab-report {run_dir} --sensitivity {bits} "
          "[--plot heatmap heat.png])")


def output_folder_problem(argv: list[str]) -> str | None:
    """Why the output folder named on the command line (or by QUANTLAB_OUTPUT_DIR) cannot be made
    or written, or None. Checked before Hydra makes the run's directory, since Hydra's own error
    there is a traceback."""
    import os

    given = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep:
            given[key] = value
    folders = [given[k] for k in ("hydra.run.dir", "hydra.sweep.dir", "paths.output_dir") if k in given]
    folders = folders or [os.environ.get("QUANTLAB_OUTPUT_DIR") or "outputs"]
    for folder in folders:
        if "${" in folder or "," in folder:  # an interpolation or a sweep: Hydra's business
            continue
        path = Path(folder).expanduser().absolute()
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"the output folder {path} cannot be made: {existing} is a file"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"the output folder {path} cannot be written: {existing} is read-only"
    return None


def main() -> None:
    """`quantlab`: the command line checked for what Hydra would refuse without guidance (a
    folder it cannot make, a mistyped key or option) before Hydra makes a run directory."""
    from quantlab.experiments.run.objective import missing_search_plugin
    from quantlab.experiments.run.overrides import override_problem

    problem = output_folder_problem(sys.argv[1:])
    if problem:
        print(f"quantlab: error: {problem}; choose another with paths.output_dir=... or QUANTLAB_OUTPUT_DIR",
              file=sys.stderr)
        sys.exit(1)
    problem = missing_search_plugin(sys.argv[1:])
    if problem:
        print(f"quantlab: error: {problem}", file=sys.stderr)
        sys.exit(1)
    typo = override_problem(sys.argv[1:])
    if typo:
        print(f"quantlab: config error: {typo}", file=sys.stderr)
        sys.exit(2)
    app()


if __name__ == "__main__":
    main()
