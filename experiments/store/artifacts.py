"""Quantization artifacts: a run's quantized model, saved once and reused by every run that would
compute the same weights.

The key covers what determines the quantized weights and nothing else: the base model's
fingerprint, dtype and device type, the method and its whole config, the calibration set's key
(text variant and content hash, tokenizer, sizes, seed) and batch size, torch's version and
`QUANTIZE_CODE_VERSION`. Evaluation settings, logging and paths are not in it, so a run that only
changes `eval` (another task, more windows, the packed backend) reloads the artifact instead of
quantizing again. Artifacts live in the shared cache (`<cache>/quantized/<key hash>/`, built once
under a lock, checked by size and sha256 on every read; `paths.cache_quantized=false` keeps them
out); `save_model=true` also puts a copy in the run directory (`quantized_model/`), and
`model.source=quantized model.path=DIR` evaluates a saved folder.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.experiments.data.calibration import calibration_source
from quantlab.experiments.models.loading import LoadedModel
from quantlab.experiments.models.quantized import (
    WEIGHTS_FILE,
    files_are_intact,
    load_formats,
    read_quant_config,
    save_quantized_model,
)
from quantlab.experiments.run.pipeline import LayerRecord, QuantizationReport
from quantlab.experiments.store.cache import (
    Cache,
    _canonical,
    build_dir_once,
    file_sha256,
    key_hash,
    log_event,
)
from quantlab.experiments.store.shared_inputs import calibration_key
from quantlab.kernels.format import WeightFormat
from quantlab.methods.base import Method

QUANTIZE_CODE_VERSION = 1  # bump when a method's output changes for the same key
SAVED_DIR = "quantized_model"
# The stored weight against the computed one, max |difference| / max |weight|: fp16 scales and
# float zero-points round at 2^-11 relative each; twice that bound, with room for the sum.
STORAGE_TOLERANCE = 2e-3


def rules_for(run: Any, method: Method) -> list:
    """The module rules that apply to `method` in this run (its own, or a compare_with's)."""
    if method.name == run.method_name:
        return list(getattr(run, "modules", []))
    return list(getattr(run, "comparison_modules", {}).get(method.name, []))


class QuantizedStore:
    """Where one method's quantized weights for this run come from and go to."""

    def __init__(self, run: Any, loaded: LoadedModel, method: Method, calibration: Any, run_dir: Path | None):
        self.run, self.loaded, self.method, self.calibration, self.run_dir = run, loaded, method, calibration, run_dir
        self.source: str | None = None  # "model.path", "cache" or "quantized"
        self.directory: Path | None = None
        self.saved_copy: Path | None = None
        self.saved_timings: dict[str, float] | None = None
        self.rules = rules_for(run, method)

    # -- the key ------------------------------------------------------------------------------------

    def key(self) -> dict[str, Any] | None:
        """None when nothing may be cached (calibration data not found: quantizing raises its error)."""
        model = self.loaded.model
        key: dict[str, Any] = {
            "model": self.loaded.fingerprint,
            "dtype": str(next(model.parameters()).dtype),
            "device": self.loaded.device.type,
            "method": self.method.name,
            "config": asdict(self.method.config),
            "torch": str(torch.__version__),
            "code": QUANTIZE_CODE_VERSION,
        }
        if self.rules:  # per-module rules decide other linears' configs
            key["modules"] = [rule.describe() for rule in self.rules]
        allocation = getattr(self.method.config, "allocation", None)  # SliM-LLM: a file of per-group widths
        if allocation:
            key["allocation_sha256"] = file_sha256(Path(allocation).expanduser())  # its content, not its path
        if self.method.needs_calibration:
            try:
                key["calib"] = calibration_key(self.run.calib.spec(), self.loaded.tokenizer)
            except FileNotFoundError:
                return None
            key["calib_batch_size"] = self.run.calib.batch_size  # the Hessian's summation order
        return key

    def _cache_target(self, key: dict[str, Any]) -> Path:
        return Cache("quantized", self.run.paths.cache_path).dir / key_hash(key)

    def _valid(self, folder: Path, key: dict[str, Any]) -> bool:
        try:
            return read_quant_config(folder).get("key") == _canonical(key) and files_are_intact(folder)
        except (OSError, ValueError):
            return False

    # -- load ---------------------------------------------------------------------------------------

    def load(self) -> QuantizationReport | None:
        """The quantized weights from `model.path` (source=quantized) or the cache, else None."""
        if self.run.model.source == "quantized":
            directory = Path(self.run.model.path)
            if not files_are_intact(directory):
                raise ValueError(f"{directory}: its files do not match the sizes and hashes in quantization.json")
            return self._read(directory, "model.path")
        if not self.run.paths.cache_quantized or (key := self.key()) is None:
            return None
        target = self._cache_target(key)
        if not self._valid(target, key):
            return None
        log_event(self.run.paths.cache_path, "quantized", target.name, "hit")
        return self._read(target, "cache")

    def _read(self, directory: Path, source: str) -> QuantizationReport:
        config = read_quant_config(directory)
        formats = load_formats(directory, exact=True)
        layers = [LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in config["records"]]
        self.source, self.directory, self.saved_timings = source, directory, config.get("timings")
        if self.calibration.record.data.get("calib") is None and config.get("calib") is not None:
            # quantized from the same calibration text, perhaps at another path: record this run's
            self.calibration.record.data["calib"] = {**config["calib"], **calibration_source(self.run.calib.spec())}
        self._copy_to_run()
        skipped = {name: tuple(shape) for name, shape in (config.get("skipped") or {}).items()}
        return QuantizationReport(layers, {}, formats, skipped, method=config.get("method"),
                                  method_config=config.get("method_config") or {}, fine_tune=config.get("fine_tune"))

    # -- save ---------------------------------------------------------------------------------------

    def save(self, report: QuantizationReport, timings: dict[str, float]) -> None:
        """Into the cache (unless paths.cache_quantized=false), and into the run with save_model."""
        self.source, self.saved_timings = "quantized", timings
        key = self.key() if self.run.paths.cache_quantized else None
        description = self._description(report, timings, key)

        def build(staging: Path) -> None:
            save_quantized_model(
                self.loaded.model, report.formats, staging, self.loaded.tokenizer, description,
                run_config=self.calibration.record.data.get("config"),
            )

        if key is not None:
            self.directory = build_dir_once(
                self._cache_target(key), build, lambda folder: self._valid(folder, key), "quantized",
                self.run.paths.cache_path,
            )
            self._copy_to_run()
        elif (self.run.save_model or self.run.export.format) and self.run_dir is not None:  # export reads it
            self.directory = self.saved_copy = self._run_copy_path()
            build(self.directory)

    def _description(self, report: QuantizationReport, timings: dict[str, float], key: dict | None) -> dict:
        spec = self.run.model
        return {
            "key": _canonical(key) if key is not None else None,
            "base_model": {
                "spec": asdict(spec), "fingerprint": self.loaded.fingerprint,
                "tokenizer_spec": asdict(self.run.tokenizer_model) if self.run.tokenizer_model else None,
            },
            "calib": self.calibration.record.data.get("calib") if self.method.needs_calibration else None,
            "modules": [rule.describe() for rule in self.rules],
            **describe_report(report, self.method.name, asdict(self.method.config), timings),
        }

    def _run_copy_path(self) -> Path:
        assert self.run_dir is not None
        suffix = "" if self.method.name == self.run.method_name else f"-{self.method.name}"
        return self.run_dir / f"{SAVED_DIR}{suffix}"

    def _copy_to_run(self) -> None:
        if not self.run.save_model or self.run_dir is None or self.directory is None:
            return
        target = self._run_copy_path()
        if target.resolve() == self.directory.resolve():
            return
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.directory, target)
        self.saved_copy = target

    def describe(self) -> dict[str, Any]:
        """The record's `quantized_model` entry (empty when nothing was quantized)."""
        if self.directory is None and self.source is None:
            return {}
        out: dict[str, Any] = {"source": self.source}
        if self.directory is not None:
            out["artifact"] = str(self.directory)
            out["artifact_bytes"] = (self.directory / WEIGHTS_FILE).stat().st_size  # measured, deployable
        if self.saved_copy is not None:
            out["saved_to"] = str(self.saved_copy)
        if self.source != "quantized" and self.saved_timings:
            out["quantize_timings"] = self.saved_timings  # what quantizing took when it was done
        return out


def describe_report(report: QuantizationReport, method: str | None, method_config: dict[str, Any],
                    timings: dict[str, float]) -> dict[str, Any]:
    """What quantization.json says of any saved quantization: the method and its config, exact
    avg_bits, skipped linears, the per-layer records and timings (a run adds its key, base model,
    calibration and rules; experiments/api.py saves this alone)."""
    return {
        "method": method,
        "method_config": method_config,
        "avg_bits": report.avg_bits,
        "skipped": {name: list(shape) for name, shape in report.skipped.items()},
        "records": [r.as_dict() for r in report.layers],
        "fine_tune": report.fine_tune,  # a whole-model stage's record (QAT), or None
        "timings": timings,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


@torch.no_grad()
def consistency_gate(model: nn.Module, formats: dict[str, WeightFormat]) -> dict:
    """Each packed linear against the fake-quant weights of its run: (1) the stored weight, whose
    fp16 scales and zero-points may differ from the computed ones by their rounding (relative
    2^-11 each, so at most STORAGE_TOLERANCE of the largest weight); (2) its kernel against that
    stored weight on a seeded probe (quantlab.kernels.linear.consistency_check, bf16-level tolerance on the
    fast paths). Raises on either; returns the largest errors."""
    from quantlab.kernels.linear import consistency_check

    worst = {"storage_rel_error": 0.0, "kernel_rel_error": 0.0}
    for name, fmt in formats.items():
        qlinear = model.get_submodule(name)
        exact = fmt.dequantize(torch.float32)
        stored = qlinear.dequantize(torch.float32).cpu()
        storage = float((stored - exact).abs().max() / exact.abs().max().clamp_min(1e-30))
        if not storage <= STORAGE_TOLERANCE:
            raise RuntimeError(
                f"packed backend: {name}'s stored weight departs from its fake-quant weight by {storage:.3g} "
                f"(relative to its largest weight), more than fp16 storage allows ({STORAGE_TOLERANCE:g})"
            )
        kernel = consistency_check(qlinear, name=name)  # raises KernelMismatch with the reason
        worst["storage_rel_error"] = max(worst["storage_rel_error"], storage)
        worst["kernel_rel_error"] = max(worst["kernel_rel_error"], kernel)
    return worst
