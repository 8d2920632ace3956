"""One run, as data flows (DESIGN.md): load, baseline, calibrate, quantize, evaluate, record.

Everything here is plain Python on a validated `RunConfig`; Hydra stays in experiments/cli.py.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from experiments.cache import Cache
from experiments.data.calibration import calibration_set
from experiments.data.protocols import eval_windows
from experiments.evaluate import paired_delta, perplexity, place_for_eval, release_from_eval
from experiments.models.loading import LoadedModel, load_model
from experiments.pipeline import QuantizationReport, quantize_model
from experiments.results import RunRecord
from experiments.schema import RunConfig
from experiments.tracking import make_tracker
from methods import get_method_class
from methods.base import Method

EVAL_CODE_VERSION = 1  # bump when the perplexity computation changes: invalidates cached baselines


def model_storage_bytes(model: torch.nn.Module, report: QuantizationReport | None) -> int:
    """Quantized linears at their exact storage bits, every other parameter at 16 bits (fp16):
    the size a deployed checkpoint of this model needs. Tied weights count once."""
    quantized_numel = sum(r.shape[0] * r.shape[1] for r in report.layers) if report else 0
    quantized_bits = sum(r.storage_bits for r in report.layers) if report else 0
    total_numel = sum(p.numel() for p in model.parameters())
    return (quantized_bits + 16 * (total_numel - quantized_numel)) // 8


def _eval_sets(loaded: LoadedModel, run: RunConfig) -> dict[str, Any]:
    ppl = run.eval.ppl
    return {
        dataset: eval_windows(dataset, loaded.tokenizer, ppl.seqlen, ppl.max_windows) for dataset in ppl.datasets
    }


def _baseline(loaded: LoadedModel, run: RunConfig, sets: dict[str, Any], record: RunRecord) -> dict[str, dict]:
    """Full-precision perplexity per dataset, computed once per (model, eval protocol) and cached."""
    cache = Cache("baseline", root=run.paths.cache_path)
    results: dict[str, dict] = {}
    seconds = 0.0
    for dataset, windows in sets.items():
        key = {
            "model": loaded.fingerprint, "dtype": str(next(loaded.model.parameters()).dtype),
            "device": loaded.device.type, "protocol": windows.protocol, "eval_code": EVAL_CODE_VERSION,
        }
        cached = cache.get_json(key)
        if cached is None:
            result = perplexity(loaded.model, loaded.architecture, windows.input_ids, run.eval.ppl.batch_size)
            seconds += result.seconds
            cached = result.as_dict()
            cache.put_json(key, cached)
        results[dataset] = cached
    record.data["timings"]["baseline_eval_s"] = seconds
    return results


@contextmanager
def data_dir_from_config(run: RunConfig):
    """The data layer reads QUANTLAB_DATA_DIR; for this run, paths.data_dir (which defaults to it)
    decides. Restored afterwards, so runs in one process do not leak into each other."""
    saved = os.environ.get("QUANTLAB_DATA_DIR")
    os.environ["QUANTLAB_DATA_DIR"] = str(Path(run.paths.data_dir).expanduser().absolute())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("QUANTLAB_DATA_DIR", None)
        else:
            os.environ["QUANTLAB_DATA_DIR"] = saved


def execute(run: RunConfig, config: dict[str, Any], run_dir: Path, progress: bool = True) -> dict[str, Any]:
    with data_dir_from_config(run):
        return _execute(run, config, run_dir, progress)


def vs_expected(measured: dict[str, dict], expected: dict[str, float]) -> dict[str, dict]:
    """Distance of each measured perplexity from its published value."""
    out = {}
    for dataset, paper in expected.items():
        ours = measured[dataset]["value"]
        inside = measured[dataset].get("ci_low") is not None and measured[dataset]["ci_low"] <= paper <= measured[dataset]["ci_high"]
        out[dataset] = {"expected": paper, "measured": ours, "diff": ours - paper, "rel_diff": ours / paper - 1,
                        "expected_inside_ci": inside}
    return out


class _Calibration:
    """The calibration tensor, drawn once and only if some method needs it."""

    def __init__(self, run: RunConfig, tokenizer: Any, record: RunRecord) -> None:
        self.run, self.tokenizer, self.record = run, tokenizer, record
        self.ids: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self.ids is None:
            start = time.perf_counter()
            self.ids, self.record.data["calib"] = calibration_set(self.run.calib.spec(), self.tokenizer)
            self.record.data["timings"]["calib_data_s"] = time.perf_counter() - start
        return self.ids


def _quantize_and_evaluate(
    loaded: LoadedModel, method: Method, run: RunConfig, sets: dict[str, Any], baseline: dict[str, dict],
    calibration: _Calibration, progress: bool,
) -> dict[str, Any]:
    """Quantize `loaded.model` in place with `method`, then evaluate it on the same windows as the
    baseline. Returns the record fields of one method."""
    model, arch = loaded.model, loaded.architecture
    calib_ids = calibration.get() if method.needs_calibration else None
    release_from_eval(model)
    start = time.perf_counter()
    report = quantize_model(model, arch, method, calib_ids, loaded.device, run.calib.batch_size, progress=progress)
    timings = {"quantize_s": time.perf_counter() - start}
    timings.update({f"quantize_{k}": v for k, v in report.seconds.items()})
    place_for_eval(model, arch, loaded.device)
    start = time.perf_counter()
    metrics: dict[str, dict] = {}
    for dataset, windows in sets.items():
        if not method.quantizes_weights:
            metrics[dataset] = dict(baseline[dataset])
        else:
            metrics[dataset] = perplexity(model, arch, windows.input_ids, run.eval.ppl.batch_size).as_dict()
        metrics[dataset]["vs_baseline"] = paired_delta(metrics[dataset]["window_nll"], baseline[dataset]["window_nll"])
    timings["eval_s"] = time.perf_counter() - start
    return {
        "layers": [r.as_dict() for r in report.layers],
        "avg_bits": report.avg_bits if report.layers else 16.0,
        "model_bytes": model_storage_bytes(model, report if report.layers else None),
        "fp16_model_bytes": model_storage_bytes(model, None),
        "metrics": {"ppl": metrics},
        "timings": timings,
    }


def _execute(run: RunConfig, config: dict[str, Any], run_dir: Path, progress: bool) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_dir, config)
    record.write()
    tracker = make_tracker(run.logger)
    timings = record.data["timings"]
    try:
        tracker.start(run_dir, run.name, config)
        random.seed(run.seed)
        torch.manual_seed(run.seed)
        method = get_method_class(run.method_name)(run.method)

        loaded = load_model(run.model, run.tokenizer_model, cache_dir=run.paths.cache_path)
        timings["load_s"] = loaded.load_seconds
        model = loaded.model
        record.data["model"] = {
            "name": run.model.name, "fingerprint": loaded.fingerprint, "model_type": model.config.model_type,
            "family": loaded.architecture.family, "n_params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": loaded.device.type,
        }
        sets = _eval_sets(loaded, run)
        record.data["eval_protocol"] = {"ppl": {ds: w.protocol for ds, w in sets.items()}}
        place_for_eval(model, loaded.architecture, loaded.device)
        baseline = _baseline(loaded, run, sets, record)
        record.data["baseline"]["ppl"] = baseline
        calibration = _Calibration(run, loaded.tokenizer, record)

        result = _quantize_and_evaluate(loaded, method, run, sets, baseline, calibration, progress)
        timings.update(result.pop("timings"))
        record.data.update(result)
        if run.expected is not None:
            record.data["expected"] = asdict(run.expected)
            record.data["vs_expected"] = vs_expected(record.data["metrics"]["ppl"], run.expected.ppl)
        record.write()

        comparisons = record.data["comparisons"] = []
        for name, config_ in run.comparisons:
            loaded = model = None  # one model in memory at a time: reload a fresh full-precision copy
            loaded = load_model(run.model, run.tokenizer_model, cache_dir=run.paths.cache_path)
            other = get_method_class(name)(config_)
            result = _quantize_and_evaluate(loaded, other, run, sets, baseline, calibration, progress)
            comparisons.append({"method": name, "bits": config_.bits, "group_size": config_.group_size,
                                "config": asdict(config_), **result})
            record.write()
        record.finish_ok()
    except BaseException as error:
        record.finish_failed(error)
        raise
    finally:
        tracker.finish(record.data)
    return record.data
