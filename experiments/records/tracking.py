"""Optional mirror of the run record to Weights & Biases (offline by default: no account needed).

The tracker is always finished, even when the run fails (a known multirun failure mode otherwise:
wandb issue #1314), and wandb failures never fail the run: the record on disk is the truth.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quantlab.experiments.run.schema import LoggerConfig

log = logging.getLogger(__name__)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)  # "/" not ".": wandb splits dotted keys
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def fidelity_summary(record: dict[str, Any]) -> dict[str, Any]:
    """Zero-shot accuracies (with stderr), the baseline's, the paired deltas with their interval
    and flips, and KL to the baseline: flat wandb keys."""
    metrics, baseline = record.get("metrics") or {}, record.get("baseline") or {}
    out: dict[str, Any] = {}
    for prefix, tasks in (("tasks", metrics.get("tasks") or {}), ("baseline_tasks", baseline.get("tasks") or {})):
        for task, entry in tasks.items():
            for name, value in entry.items():  # every number: acc, stderr, exact_match,<filter>, n, ...
                if isinstance(value, int | float) and not isinstance(value, bool):
                    out[f"{prefix}/{task}/{name}"] = value
    for task, delta in (metrics.get("delta") or {}).items():
        if "value" in delta:  # acc
            for name in ("value", "ci_low", "ci_high", "gained", "lost", "significant"):
                out[f"delta/{task}/{name}"] = delta.get(name)
        for metric, nested in delta.items():  # acc_norm, exact_match,<filter>
            if isinstance(nested, dict):
                for name in ("value", "ci_low", "ci_high"):
                    out[f"delta/{task}/{metric}/{name}"] = nested.get(name)
    for dataset, kl in (metrics.get("kl") or {}).items():
        for name in ("mean_kl", "ci_low", "ci_high", "top1_agreement"):
            out[f"kl/{dataset}/{name}"] = kl.get(name)
    return out


class Tracker:
    def start(self, run_dir: Path, name: str, config: dict[str, Any]) -> None: ...
    def finish(self, record: dict[str, Any]) -> None: ...


class NoTracker(Tracker):
    pass


class WandbTracker(Tracker):
    def __init__(self, settings: LoggerConfig) -> None:
        self.settings = settings
        self.run = None

    def start(self, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb

            self.run = wandb.init(
                project=self.settings.project, entity=self.settings.entity, mode=self.settings.mode,
                group=self.settings.group, job_type=self.settings.job_type, tags=self.settings.tags or None,
                name=name, dir=str(run_dir), config=flatten(config), reinit="finish_previous",
                settings=wandb.Settings(silent=True),
            )
        except Exception as error:  # noqa: BLE001 - tracking never fails a run: the record is the truth
            log.warning("wandb could not start (%s: %s): the run goes on without tracking", type(error).__name__, error)
            self.run = None

    def finish(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        import wandb

        try:
            summary = {"status": record["status"], "avg_bits": record.get("avg_bits"),
                       "model_bytes": record.get("model_bytes")}
            for dataset, ppl in record.get("metrics", {}).get("ppl", {}).items():
                summary[f"ppl/{dataset}"] = ppl.get("value")
            for dataset, ppl in record.get("baseline", {}).get("ppl", {}).items():
                summary[f"baseline_ppl/{dataset}"] = ppl.get("value")
            summary.update(fidelity_summary(record))
            summary.update({f"timings/{k}": v for k, v in record.get("timings", {}).items()})
            self.run.log({k: v for k, v in summary.items() if v is not None})
            layers = record.get("layers") or []
            if layers:
                columns = ["name", "bits", "bits_per_weight", "rel_weight_error", "seconds"]
                self.run.log({"layers": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in layers])})
            if record.get("error"):
                self.run.summary["error"] = record["error"]
        except Exception as error:  # noqa: BLE001 - tracking must never fail a finished run
            log.warning("wandb logging failed: %s", error)
        finally:
            try:
                self.run.finish(exit_code=0 if record["status"] == "ok" else 1)
            except Exception as error:  # noqa: BLE001 - nor does finishing it
                log.warning("wandb could not finish the run: %s", error)
            self.run = None


def group_by_sweep(cfg: Any) -> None:
    """In a sweep, a wandb logger with no group of its own takes the sweep's name: one wandb group
    per sweep, one wandb run per job (each job starts and finishes its own run)."""
    from omegaconf import open_dict

    logger = cfg.get("logger")
    if logger is not None and logger.get("name") == "wandb" and logger.get("group") is None:
        with open_dict(cfg):
            cfg.logger.group = cfg.get("sweep_name")


def make_tracker(settings: LoggerConfig) -> Tracker:
    return WandbTracker(settings) if settings.name == "wandb" else NoTracker()
