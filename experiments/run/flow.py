"""One run, as data flows (DESIGN.md): load, baseline, calibrate, quantize, evaluate, record.

Everything here is plain Python on a validated `RunConfig`; Hydra stays in experiments/run/cli.py.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from quantlab.experiments.data.calibration import check_chat_template
from quantlab.experiments.evaluation import zeroshot_and_kl
from quantlab.experiments.evaluation.perplexity import perplexity, place_for_eval, release_from_eval
from quantlab.experiments.evaluation.statistics import paired_delta
from quantlab.experiments.models.adapters import check_method_fits
from quantlab.experiments.models.loading import LoadedModel, ModelSpec, load_model
from quantlab.experiments.models.quantized import apply_formats, read_quant_config, restore_other_tensors
from quantlab.experiments.records.record import RunRecord
from quantlab.experiments.records.sensitivity_record import SENSITIVITY_FILE
from quantlab.experiments.records.tracking import make_tracker
from quantlab.experiments.run import activations, allocation, allocation_files, module_rules, sensitivity
from quantlab.experiments.run.checks import needs_calibration
from quantlab.experiments.run.pipeline import QuantizationReport, quantize_model
from quantlab.experiments.run.schema import RunConfig
from quantlab.experiments.store.artifacts import QuantizedStore, consistency_gate
from quantlab.experiments.store.cache import Cache, atomic_write_json
from quantlab.experiments.store.shared_inputs import (
    cached_block_inputs,
    cached_calibration_set,
    cached_eval_windows,
)
from quantlab.kernels.linear import model_weight_bytes
from quantlab.methods import get_method_class
from quantlab.methods.base import ConfigError, Method

log = logging.getLogger(__name__)
EVAL_CODE_VERSION = 1  # bump when the perplexity computation changes: invalidates cached baselines
KV_MEMORY_TOKENS = (2048, 8192)  # context lengths at which the KV cache's stored bytes are measured


def model_storage_bytes(model: torch.nn.Module, report: QuantizationReport | None) -> int:
    """Quantized linears at their exact storage bits, every other parameter at 16 bits (fp16):
    the size a deployed checkpoint of this model needs. Tied weights count once."""
    quantized_numel = sum(r.shape[0] * r.shape[1] for r in report.layers) if report else 0
    quantized_bits = sum(r.storage_bits for r in report.layers) if report else 0
    total_numel = sum(p.numel() for p in model.parameters())
    return (quantized_bits + 16 * (total_numel - quantized_numel)) // 8


def kv_record(run: RunConfig, model: torch.nn.Module) -> tuple[float, dict[str, Any]]:
    """(kv_bits, the record's `kv`): the settings and, when on, the cache of this model's shape
    measured at KV_MEMORY_TOKENS (experiments/models/kv_cache.py cache_memory); kv_bits is the
    stored bits per cached number at 2048 tokens, scales, minima and residual included (16: off)."""
    entry: dict[str, Any] = {**asdict(run.kv), "enabled": run.kv.enabled}
    if not run.kv.enabled:
        return 16.0, entry
    from quantlab.experiments.models.kv_cache import cache_memory, kv_shape

    shape = kv_shape(model.config)
    memory = {str(tokens): cache_memory(shape, run.kv.quantizer(), tokens, run.kv.chunk) for tokens in KV_MEMORY_TOKENS}
    entry.update(shape=asdict(shape), memory=memory)
    return memory[str(KV_MEMORY_TOKENS[0])]["bits_per_element"], entry


def log_perplexity(label: str, result: dict[str, Any], note: str = "") -> None:
    """One console and log-file line per evaluated dataset: perplexity with its 95% interval."""
    from quantlab.experiments.records.reporting.tables import format_interval

    value = format_interval(result["value"], result.get("ci_low"), result.get("ci_high"), 2)
    log.info("%s: ppl %s (%d windows, %.1f s%s)", label, value, result["n_windows"], result["seconds"], note)


def _eval_sets(loaded: LoadedModel, run: RunConfig) -> dict[str, Any]:
    """Tokenized once per (text, tokenizer, seqlen, windows) on this machine, then read from the cache."""
    ppl = run.eval.ppl
    return {
        dataset: cached_eval_windows(dataset, loaded.tokenizer, ppl.seqlen, ppl.max_windows, run.paths.cache_path)
        for dataset in ppl.datasets
    }


def _baseline(
    loaded: LoadedModel, run: RunConfig, sets: dict[str, Any], record: RunRecord, progress: bool = False
) -> dict[str, dict]:
    """Full-precision perplexity per dataset, computed once per (model, eval protocol) and cached."""
    cache = Cache("baseline", root=run.paths.cache_path)
    results: dict[str, dict] = {}
    seconds = 0.0
    for dataset, windows in sets.items():
        before = seconds
        key = {
            "model": loaded.fingerprint, "dtype": str(next(loaded.model.parameters()).dtype),
            "device": loaded.device.type, "protocol": windows.protocol, "eval_code": EVAL_CODE_VERSION,
        }

        def compute(windows=windows) -> dict:
            nonlocal seconds
            result = perplexity(loaded.model, loaded.architecture, windows.input_ids, run.eval.ppl.batch_size,
                                progress=progress)
            seconds += result.seconds
            return result.as_dict()

        # locked: parallel sweep workers wait for the one computing it instead of computing it too
        results[dataset] = cache.get_or_compute_json(key, compute)
        log_perplexity(f"baseline {dataset}", results[dataset], "" if seconds > before else ", cached")
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
    """The calibration tensor, drawn once and only if some method needs it (through the cache,
    which also holds block 0's inputs for it unless paths.cache_block_inputs is false)."""

    def __init__(self, run: RunConfig, tokenizer: Any, record: RunRecord) -> None:
        self.run, self.tokenizer, self.record = run, tokenizer, record
        self.ids: torch.Tensor | None = None
        self.key: dict[str, Any] | None = None

    def get(self) -> torch.Tensor:
        if self.ids is None:
            start = time.perf_counter()
            self.ids, self.record.data["calib"], self.key = cached_calibration_set(
                self.run.calib.spec(), self.tokenizer, self.run.paths.cache_path
            )
            self.record.data["timings"]["calib_data_s"] = time.perf_counter() - start
            # What the method saw: with AWQ's sampling, nsamples counts lines, not sequences.
            n_sequences, seqlen_used = self.ids.shape
            self.record.data["calib"] = {
                **self.record.data["calib"], "n_sequences": n_sequences, "seqlen_used": seqlen_used
            }
            calib = self.run.calib
            log.info("calibration: %d sequences x %d tokens of %s (seed %d), %.1f s", n_sequences, seqlen_used,
                     calib.path if calib.source == "custom" else calib.dataset, calib.seed,
                     self.record.data["timings"]["calib_data_s"])
        return self.ids

    def block_inputs(self, loaded: LoadedModel) -> tuple[Any, float]:
        """(block 0's inputs or None to let the driver capture them, seconds spent)."""
        ids = self.get()
        if not self.run.paths.cache_block_inputs or self.key is None:
            return None, 0.0
        return cached_block_inputs(loaded, ids, self.key, self.run.calib.batch_size, self.run.paths.cache_path)


def model_label(method_name: str, bits: int, group_size: int) -> str:
    """How one evaluated model is named in zeroshot_items.json and lm_eval/: method, bits, group size."""
    return f"{method_name} W{bits} g{group_size}"


def _quantize_and_evaluate(
    loaded: LoadedModel, method: Method, run: RunConfig, sets: dict[str, Any], baseline: dict[str, dict],
    calibration: _Calibration, progress: bool, extras: zeroshot_and_kl.Baseline | None = None,
    run_dir: Path | None = None, export: bool = False, label: str = "model",
) -> dict[str, Any]:
    """Quantize `loaded.model` in place with `method`, then evaluate it on the same windows as the
    baseline. Returns the record fields of one method. `export`: write the saved quantized model
    in `run.export.format` as soon as it is there (before evaluating). `label`: the model's name in
    the run folder's per-model files (model_label)."""
    if method.runtime == "onnxruntime":  # quantized and evaluated as an ONNX graph (methods/onnx_int8.py)
        from quantlab.experiments.evaluation import onnx_runtime

        release_from_eval(loaded.model)
        return onnx_runtime.quantize_and_evaluate(loaded, method, run, sets, baseline, calibration)
    model, arch = loaded.model, loaded.architecture
    release_from_eval(model)
    store = QuantizedStore(run, loaded, method, calibration, run_dir)
    start = time.perf_counter()
    # static activation ranges are calibrated while quantizing; an artifact holds weights only
    static = activations.StaticCalibration(run.act, run.observer) if run.act.static else None
    report = store.load() if method.quantizes_weights and static is None else None  # a saved or cached quantization
    if report is None:
        needs_data = method.needs_calibration or static is not None
        calib_ids = calibration.get() if needs_data else None
        inputs, inputs_s = calibration.block_inputs(loaded) if needs_data else (None, 0.0)
        report = quantize_model(
            model, arch, method, calib_ids, loaded.device, run.calib.batch_size, progress=progress,
            block_inputs=inputs, rules=store.rules, activations=static,
        )
        timings = {"quantize_s": time.perf_counter() - start}
        if inputs is not None:
            timings["quantize_capture_s"] = inputs_s  # captured or read from the cache
        timings.update({f"quantize_{k}": v for k, v in report.seconds.items()})
        if report.formats:
            store.save(report, timings)
    else:
        apply_formats(model, report.formats, "fake")
        # what the method changed outside the linears (AWQ's folded scales, QAT's trained norms)
        restore_other_tensors(model, store.directory, report.formats)
        timings = {"load_quantized_s": time.perf_counter() - start}
    quantized_model = store.describe()
    exported = None
    if export and run.export.format and report.formats and store.directory is not None and run_dir is not None:
        from quantlab.experiments.export import export_model
        from quantlab.experiments.export.plan import export_path

        options = {"checkpoint_format": run.export.checkpoint_format} if run.export.format == "gptq" else {}
        exported = export_model(store.directory, run.export.format, export_path(run, run_dir), **options)
    # Counted on the dense model (QuantLinear holds its weight in buffers, not parameters).
    sizes = {
        "model_bytes": model_storage_bytes(model, report if report.layers else None),
        "fp16_model_bytes": model_storage_bytes(model, None),
    }
    if run.eval.backend == "packed" and report.formats:
        kernels = apply_formats(model, report.formats, "packed", run.eval.kernel)
        quantized_model["eval_backend"] = {
            "backend": "packed", "kernel": run.eval.kernel, "kernels": dict(Counter(kernels.values())),
            "consistency": consistency_gate(model, report.formats),
            "weight_bytes": model_weight_bytes(model),  # measured: parameters and buffers in memory
        }
    elif report.formats:
        quantized_model["eval_backend"] = {"backend": "fake"}
    int8_matmul = activations.int8_matmul_applies(run.act, run.eval.backend, run.eval.kernel, loaded.device)
    act_linears = activations.attach(model, arch, run.act, report.skipped, report.act_ranges, int8_matmul)
    kv = run.kv.quantizer() if run.kv.enabled else None  # perplexity as a chunked prefill through it
    changes_model = method.quantizes_weights or sum(act_linears.values()) > 0 or kv is not None  # else the baseline's own
    place_for_eval(model, arch, loaded.device)
    start = time.perf_counter()
    metrics: dict[str, dict] = {}
    extras = extras or zeroshot_and_kl.Baseline()
    kl: dict[str, dict] = {}
    for dataset, windows in sets.items():
        if not changes_model:
            metrics[dataset] = dict(baseline[dataset])
            if (same := zeroshot_and_kl.identical_kl(extras, dataset)) is not None:
                kl[dataset] = same
        else:
            observer = zeroshot_and_kl.kl_observer(extras, dataset)  # KL inside the perplexity pass
            metrics[dataset] = perplexity(
                model, arch, windows.input_ids, run.eval.ppl.batch_size, progress=progress, observer=observer,
                chunk=run.kv.chunk if kv is not None else None, kv=kv,
            ).as_dict()
            if observer is not None:
                kl[dataset] = observer.result()
        log_perplexity(f"{method.name} {dataset}", metrics[dataset], "" if changes_model else ", the baseline's")
        metrics[dataset]["vs_baseline"] = paired_delta(metrics[dataset]["window_nll"], baseline[dataset]["window_nll"])
    timings["eval_s"] = time.perf_counter() - start
    zeroshot = zeroshot_and_kl.evaluate(model, loaded.tokenizer, run, extras, changes_model, run_dir, label)
    if zeroshot:
        timings["tasks_s"] = zeroshot["seconds"]
    kv_bits, kv_entry = kv_record(run, model)
    return {
        **({"quantized_model": quantized_model} if quantized_model else {}),
        **({"export": exported} if exported else {}),
        "layers": [r.as_dict() for r in report.layers],
        **({"fine_tune": report.fine_tune} if report.fine_tune else {}),  # QAT: loss curve, steps, seconds
        **({"module_rules": module_rules.summary(store.rules, report.layers, report.skipped)} if store.rules else {}),
        "avg_bits": report.avg_bits if report.layers else 16.0,  # weights only; act_bits beside it
        "act_bits": run.act.bits,
        "act": activations.record_entry(run.act, run.observer, report.act_ranges, act_linears),
        "kv_bits": kv_bits,  # bits per cached number, measured from the stored bytes (16: off)
        "kv": kv_entry,
        **sizes,
        "metrics": {"ppl": metrics, **({"kl": kl} if kl else {}),
                    **({"tasks": zeroshot["tasks"], "delta": zeroshot["delta"]} if zeroshot else {})},
        **({"lm_eval_files": zeroshot["lm_eval_files"]} if zeroshot and "lm_eval_files" in zeroshot else {}),
        "timings": timings,
        "_items": zeroshot.get("items") if zeroshot else None,  # per-item outcomes: written beside result.json
    }


def _check_allocation_model(run: RunConfig, loaded: LoadedModel) -> None:
    """The sensitivity record of an allocation must come from these very weights (the spec was
    compared before loading; the fingerprint needs the model)."""
    plan = run.allocation
    if plan is not None and plan.model_fingerprint and plan.model_fingerprint != loaded.fingerprint:
        raise ConfigError(f"allocation.sensitivity={plan.source} was measured on weights {plan.model_fingerprint}, "
                          f"but {run.model.name!r} loads as {loaded.fingerprint}: measure this model again")


def _sensitivity(loaded: LoadedModel, run: RunConfig, record: RunRecord, run_dir: Path, progress: bool) -> dict:
    """experiment=sensitivity on the loaded model: sensitivity.json in the run directory."""
    config = run.sensitivity
    dataset = config.dataset or run.eval.ppl.datasets[0]
    windows = cached_eval_windows(dataset, loaded.tokenizer, config.seqlen, config.windows, run.paths.cache_path)
    if windows.input_ids.shape[0] < 2:
        raise ConfigError(f"{dataset} gives {windows.input_ids.shape[0]} window(s) of {config.seqlen} tokens; "
                          "the paired interval needs 2: lower sensitivity.seqlen")
    place_for_eval(loaded.model, loaded.architecture, loaded.device)
    calibration = _Calibration(run, loaded.tokenizer, record)
    calib_ids = calibration.get()
    inputs, _ = calibration.block_inputs(loaded)
    result = sensitivity.measure(loaded, run, calib_ids, inputs, windows, progress)
    atomic_write_json(run_dir / SENSITIVITY_FILE, result)
    return result


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
        allocation_files.attach(method)  # method.allocation (SliM-LLM): read before the model loads
        tasks = zeroshot_and_kl.plan(run)  # unknown tasks or missing task data fail before the model loads
        base_spec, tokenizer_spec = run.model, run.tokenizer_model
        if run.model.source == "quantized":  # evaluate a saved quantized model: its base model and method
            saved = read_quant_config(Path(run.model.path))
            base_spec = ModelSpec(**saved["base_model"]["spec"])
            if saved["base_model"].get("tokenizer_spec"):
                tokenizer_spec = ModelSpec(**saved["base_model"]["tokenizer_spec"])
            method_class = get_method_class(saved["method"])
            method = method_class(method_class.config_class(**saved["method_config"]))
            record.data.update(method=saved["method"], bits=saved["method_config"].get("bits"),
                               group_size=saved["method_config"].get("group_size"))

        loaded = load_model(base_spec, tokenizer_spec, cache_dir=run.paths.cache_path)
        if run.model.source == "quantized" and loaded.fingerprint != saved["base_model"]["fingerprint"]:
            raise ValueError(
                f"{run.model.path} was quantized from {saved['base_model']['fingerprint']}, but its base model "
                f"{base_spec.name!r} now loads as {loaded.fingerprint}; the saved weights do not belong to it"
            )
        timings["load_s"] = loaded.load_seconds
        # module rules against the model's real linears, before the baseline or calibration
        for name, rules in [(run.method_name, run.modules), *run.comparison_modules.items()]:
            module_rules.check_model(rules, loaded.architecture, loaded.model, get_method_class(name))
        _check_allocation_model(run, loaded)
        if run.kv.enabled:  # a model this cache cannot serve fails here, before the baseline
            from quantlab.experiments.models.kv_cache import check_kv_model

            check_kv_model(loaded.model.config, run.kv.quantizer(), base_spec.name)
        for name in [run.method_name, *(other for other, _ in run.comparisons)]:  # AWQ on a derived adapter
            check_method_fits(loaded.architecture, get_method_class(name))
        if run.calib.chat_template and needs_calibration(run):  # before the baseline, not after it
            check_chat_template(loaded.tokenizer)
        zeroshot_and_kl.check_prompting(loaded.tokenizer, run)  # eval.apply_chat_template needs a template
        model = loaded.model
        record.data["model"] = {
            "name": base_spec.name, "fingerprint": loaded.fingerprint, "model_type": model.config.model_type,
            "family": loaded.architecture.family, "n_params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": loaded.device.type,
        }
        if run.sensitivity is not None:  # experiment=sensitivity: its own windows and reference, no baseline
            record.data["sensitivity"] = _sensitivity(loaded, run, record, run_dir, progress)
            record.finish_ok()
            return record.data
        if run.allocation is not None:
            record.data["allocation"] = {**run.allocation.describe(),
                                         "rules_file": str(allocation.write_rules(run.allocation, run_dir))}
        sets = _eval_sets(loaded, run)
        record.data["eval_protocol"] = {"ppl": {ds: w.protocol for ds, w in sets.items()}}
        place_for_eval(model, loaded.architecture, loaded.device)
        baseline = _baseline(loaded, run, sets, record, progress)
        record.data["baseline"]["ppl"] = baseline
        extras = zeroshot_and_kl.compute_baseline(loaded, run, sets, tasks, record)
        calibration = _Calibration(run, loaded.tokenizer, record)

        label = model_label(run.method_name, run.bits, run.group_size)
        result = _quantize_and_evaluate(loaded, method, run, sets, baseline, calibration, progress, extras, run_dir,
                                        export=True, label=label)
        timings.update(result.pop("timings"))
        allocation_files.save(method, result["layers"])  # method.save_allocation (SliM-LLM)
        if (items := result.pop("_items")) is not None:
            zeroshot_and_kl.write_items(run_dir, label, items)
        record.data.update(result)
        if run.allocation is not None:
            measured = record.data["avg_bits"]
            record.data["allocation"].update(measured_avg_bits=measured,
                                             predicted_matches_measured=measured == run.allocation.predicted_avg_bits)
        if run.expected is not None:
            record.data["expected"] = asdict(run.expected)
            record.data["vs_expected"] = vs_expected(record.data["metrics"]["ppl"], run.expected.ppl)
        record.write()

        comparisons = record.data["comparisons"] = []
        for name, config_ in run.comparisons:
            loaded = model = None  # one model in memory at a time: reload a fresh full-precision copy
            loaded = load_model(base_spec, tokenizer_spec, cache_dir=run.paths.cache_path)
            other = get_method_class(name)(config_)
            allocation_files.attach(other)
            label = model_label(name, config_.bits, config_.group_size)
            result = _quantize_and_evaluate(loaded, other, run, sets, baseline, calibration, progress, extras, run_dir,
                                            label=label)
            if (items := result.pop("_items")) is not None:
                zeroshot_and_kl.write_items(run_dir, label, items)
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
