"""`experiment=sensitivity`: the damage of quantizing one unit (a linear or a block) at each width,
everything else in full precision, and cheap proxies of it (methods/sensitivity.py).

    quantlab experiment=sensitivity method=gptq sensitivity.unit=linear 'sensitivity.bits=[2,3,4,8]'

Protocol (the standard one for per-layer sensitivity, e.g. HAWQ-V2/V3, OWQ's and SliM-LLM's
layer studies): one calibration pass with full-precision inputs collects every linear's Hessian
H = (2/N) Σ x xᵀ (methods/hessian.py, through the block driver's input capture and views; the
inputs of block i are block i-1's full-precision outputs); a few backward passes on calibration
sequences give the empirical Fisher diagonal of every linear weight. Then, for each unit and
each width, the unit's linears are quantized from their full-precision weights and that Hessian
(GPTQ against full-precision inputs, each linear of a block independently, not true-sequential;
RTN needs no Hessian), written into the model, the windows evaluated, and the weights restored.
No unit's measurement sees another unit quantized.

Damage, per unit × width, on `sensitivity.windows` windows of `sensitivity.seqlen` tokens of the
first eval.ppl dataset: perplexity, the paired mean NLL increase over the full-precision model on
the same windows with its t interval (experiments/evaluation/statistics.py `paired_delta`), and
KL to full precision (experiments/evaluation/kl.py, eval.kl's top_k / tail_samples), plus the
proxies and the seconds spent. The record is `sensitivity.json` in the run directory and the
`sensitivity` section of result.json; `allocation.sensitivity=` reads it
(experiments/run/allocation.py), `quantlab-report --sensitivity` draws and ranks it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantlab.experiments.evaluation.kl import KLAccumulator, TopKRecorder
from quantlab.experiments.evaluation.perplexity import perplexity
from quantlab.experiments.evaluation.statistics import paired_delta
from quantlab.experiments.records.sensitivity_record import RECORD_VERSION, SENSITIVITY_FILE
from quantlab.kernels import QuantizedWeight
from quantlab.methods.base import ConfigError, MethodConfig
from quantlab.methods.hessian import collect_hessians
from quantlab.methods.sensitivity import fisher_error, hessian_trace_error, output_error

UNITS = ("linear", "block")
METHODS = ("rtn", "gptq")  # methods that quantize one linear from its weight (and Hessian) alone
if TYPE_CHECKING:  # the driver imports the schema, which imports this module's config
    from quantlab.experiments.run.pipeline import BlockInputs

PROXIES = ("hessian_trace_error", "output_error", "fisher_error")


@dataclass
class SensitivityConfig:
    """`sensitivity.*` (conf/experiment/sensitivity.yaml); the method is the run's `method=`."""

    unit: str = "linear"  # linear | block
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    windows: int = 8  # evaluation windows per measurement
    seqlen: int = 512  # tokens per window
    dataset: str | None = None  # null: the first of eval.ppl.datasets
    fisher_samples: int = 8  # calibration sequences with a backward pass each; 0: no Fisher proxy


def check_config(config: SensitivityConfig, method_name: str, method: MethodConfig, eval_datasets: list[str],
                 has_modules: bool, has_comparisons: bool) -> None:
    """Everything about the sensitivity block before the model loads."""
    if config.unit not in UNITS:
        raise ConfigError(f"sensitivity.unit={config.unit!r} is not valid; choose one of: {', '.join(UNITS)}")
    if method_name not in METHODS:
        raise ConfigError(f"experiment=sensitivity quantizes one unit at a time from full-precision statistics, "
                          f"which method={method_name} cannot do; use method={' or method='.join(METHODS)}")
    if not config.bits or len(set(config.bits)) != len(config.bits):
        raise ConfigError(f"sensitivity.bits={config.bits} must list distinct widths, e.g. [2,3,4,8]")
    for bits in config.bits:
        try:
            dataclasses.replace(method, bits=bits).validate(method_name)
        except ConfigError as error:
            raise ConfigError(f"sensitivity.bits: {error}") from None
    if config.windows < 2:
        raise ConfigError(f"sensitivity.windows={config.windows}: at least 2 windows are needed for an interval")
    if config.seqlen < 2:
        raise ConfigError(f"sensitivity.seqlen={config.seqlen} must be at least 2 tokens")
    if config.fisher_samples < 0:
        raise ConfigError(f"sensitivity.fisher_samples={config.fisher_samples} must be 0 (no Fisher proxy) or more")
    if config.dataset is not None and config.dataset not in eval_datasets:
        raise ConfigError(f"sensitivity.dataset={config.dataset!r} is not among eval.ppl.datasets={eval_datasets}")
    if has_modules or has_comparisons:
        raise ConfigError("experiment=sensitivity measures one unit at a time with everything else in full "
                          "precision: drop modules= / rules= / allocation and compare_with")


def read_record(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A sensitivity record from its file or the run directory holding it, checked for shape."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SENSITIVITY_FILE
    if not path.is_file():
        raise ConfigError(f"allocation.sensitivity={str(path)!r}: no such file (the {SENSITIVITY_FILE} of an "
                          "experiment=sensitivity run)")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"allocation.sensitivity={path}: not a readable JSON file ({error})") from None
    keys = ("version", "model", "unit", "bits", "group_size", "units")
    if not isinstance(record, dict) or any(key not in record for key in keys):
        raise ConfigError(f"allocation.sensitivity={path}: not a sensitivity record (it needs {', '.join(keys)})")
    if record["version"] != RECORD_VERSION:
        raise ConfigError(f"allocation.sensitivity={path}: record version {record['version']}, this code reads "
                          f"{RECORD_VERSION}; measure again")
    return record, path


def quantize_linear(method_name: str, config: MethodConfig, weight: torch.Tensor,
                    hessian: torch.Tensor | None) -> QuantizedWeight:
    """One linear by `method_name` from its full-precision weight (and Hessian, for GPTQ)."""
    if method_name == "rtn":
        from quantlab.methods.rtn import round_to_nearest

        return round_to_nearest(weight, config.grid(), config.group_size, config.per_tensor)  # type: ignore[attr-defined]
    if method_name == "gptq":
        from quantlab.methods.gptq import gptq_quantize, tf32_disabled

        with tf32_disabled():
            return gptq_quantize(weight, hessian, config.grid(), **config.solver_options())[0]  # type: ignore[attr-defined]
    raise ConfigError(f"sensitivity cannot quantize with method={method_name}; use {' or '.join(METHODS)}")


@torch.no_grad()
def full_precision_hessians(model: torch.nn.Module, arch: Any, calib_ids: torch.Tensor, device: torch.device,
                            batch_size: int, inputs: BlockInputs | None = None) -> dict[str, torch.Tensor]:
    """Every decoder linear's H from one pass with full-precision inputs: each block's Hessians,
    then its full-precision outputs become the next block's inputs. Linears sharing an input
    share one tensor."""
    from quantlab.experiments.run.pipeline import DecoderBlockView, capture_block_inputs

    inputs = inputs if inputs is not None else capture_block_inputs(model, arch, calib_ids, device, batch_size)
    hessians: dict[str, torch.Tensor] = {}
    for index, block in enumerate(arch.block_list(model)):
        view = DecoderBlockView(index, f"{arch.blocks}.{index}", block, arch, inputs)
        accumulators, _ = collect_hessians(view, list(view.linears))
        hessians.update({f"{view.name}.{name}": acc.hessian for name, acc in accumulators.items()})
        view.advance_in_place()
    return hessians


def fisher_diagonals(model: torch.nn.Module, calib_ids: torch.Tensor, paths: list[str],
                     samples: int) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal F = (1/S) Σ_s (∂L_s/∂W)² of each named linear's weight, L_s the
    mean next-token NLL of calibration sequence s, over the first `samples` sequences."""
    params = {name: p for name, p in model.named_parameters()}
    saved = {name: p.requires_grad for name, p in params.items()}
    weights = {path: params[f"{path}.weight"] for path in paths}
    fisher = {path: torch.zeros_like(w, dtype=torch.float32) for path, w in weights.items()}
    device = next(iter(weights.values())).device
    sequences = calib_ids[:samples]
    try:
        for p in params.values():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for sequence in sequences:
                ids = sequence.unsqueeze(0).to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                grads = torch.autograd.grad(loss, list(weights.values()))
                for path, grad in zip(weights, grads):
                    fisher[path] += grad.float().pow(2)
    finally:
        for name, p in params.items():
            p.requires_grad_(saved[name])
    return {path: f / len(sequences) for path, f in fisher.items()}


def units_of(arch: Any, model: torch.nn.Module, unit: str) -> list[dict[str, Any]]:
    """The units in execution order: each linear ({block, role: its name in the block}) or each
    block (role "block")."""
    names = list(arch.linears)
    out = []
    for index in range(len(arch.block_list(model))):
        block = f"{arch.blocks}.{index}"
        if unit == "block":
            out.append({"name": block, "block": index, "role": "block", "linears": [f"{block}.{n}" for n in names]})
        else:
            out.extend({"name": f"{block}.{n}", "block": index, "role": n, "linears": [f"{block}.{n}"]} for n in names)
    return out


@dataclass
class Reference:
    """The full-precision model on the windows: per-window NLL and the KL baseline's summary."""

    windows: torch.Tensor
    window_nll: list[float]
    ppl: float
    kl_summary: Any
    batch_size: int


def reference_pass(model: torch.nn.Module, arch: Any, windows: torch.Tensor, batch_size: int, top_k: int,
                   tail_samples: int) -> Reference:
    recorder = TopKRecorder(windows.shape[0], windows.shape[1] - 1, top_k, tail_samples)
    result = perplexity(model, arch, windows, batch_size, observer=recorder)
    return Reference(windows, result.window_nll, result.value, recorder.summary(), batch_size)


@torch.no_grad()
def measure_unit(model: torch.nn.Module, arch: Any, reference: Reference, linears: list[str], method_name: str,
                 config: MethodConfig, hessians: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]
                 ) -> dict[str, Any]:
    """Quantize `linears` (from their current, full-precision weights), evaluate, restore."""
    start = time.perf_counter()
    saved = {path: model.get_submodule(path).weight.detach().clone() for path in linears}
    storage_bits = 0
    proxies = dict.fromkeys(PROXIES, 0.0) if fisher else dict.fromkeys(PROXIES[:2], 0.0)
    try:
        for path in linears:
            weight = saved[path]
            qweight = quantize_linear(method_name, config, weight, hessians.get(path))
            storage_bits += qweight.storage_bits()
            quantized = qweight.dequantize(torch.float32).to(weight.device)
            hessian = hessians[path]
            proxies["hessian_trace_error"] += hessian_trace_error(weight, quantized, torch.diagonal(hessian))
            proxies["output_error"] += output_error(weight, quantized, hessian)
            if fisher:
                proxies["fisher_error"] += fisher_error(weight, quantized, fisher[path])
            model.get_submodule(path).weight.data.copy_(quantized.to(weight.dtype))
        observer = KLAccumulator(reference.kl_summary)
        result = perplexity(model, arch, reference.windows, reference.batch_size, observer=observer)
    finally:
        for path, weight in saved.items():
            model.get_submodule(path).weight.data.copy_(weight)
    kl = observer.result()
    kl.pop("window_kl")
    return {
        "storage_bits": storage_bits, "ppl": result.value,
        "nll_delta": paired_delta(result.window_nll, reference.window_nll), "kl": kl,
        "proxies": proxies, "seconds": time.perf_counter() - start, "window_nll": result.window_nll,
    }


def measure(loaded: Any, run: Any, calib_ids: torch.Tensor, inputs: BlockInputs | None, windows: Any,
            progress: bool = True) -> dict[str, Any]:
    """The whole experiment on a loaded full-precision model; returns the sensitivity record."""
    from tqdm.auto import tqdm

    config: SensitivityConfig = run.sensitivity
    model, arch, device = loaded.model, loaded.architecture, loaded.device
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    hessians = full_precision_hessians(model, arch, calib_ids, device, run.calib.batch_size, inputs)
    seconds["hessians_s"] = time.perf_counter() - start
    units = units_of(arch, model, config.unit)
    start = time.perf_counter()
    paths = [path for unit in units for path in unit["linears"]]
    fisher = fisher_diagonals(model, calib_ids, paths, config.fisher_samples) if config.fisher_samples else {}
    seconds["fisher_s"] = time.perf_counter() - start
    start = time.perf_counter()
    reference = reference_pass(model, arch, windows.input_ids, run.eval.ppl.batch_size, run.eval.kl.top_k,
                               run.eval.kl.tail_samples)
    seconds["reference_s"] = time.perf_counter() - start
    configs = {bits: dataclasses.replace(run.method, bits=bits) for bits in sorted(config.bits)}
    start = time.perf_counter()
    for unit in tqdm(units, desc=f"sensitivity ({config.unit})", disable=not progress):
        unit["numel"] = sum(model.get_submodule(p).weight.numel() for p in unit["linears"])
        unit["widths"] = {str(bits): measure_unit(model, arch, reference, unit["linears"], run.method_name, cfg,
                                                  hessians, fisher)
                          for bits, cfg in configs.items()}
    seconds["units_s"] = time.perf_counter() - start
    return {
        "version": RECORD_VERSION,
        "model": {"spec": asdict(run.model), "fingerprint": loaded.fingerprint},
        "method": run.method_name, "method_config": asdict(run.method), "group_size": run.method.group_size,
        "unit": config.unit, "bits": sorted(config.bits), "config": asdict(config),
        "protocol": {"windows": windows.protocol, "calibration_sequences": int(calib_ids.shape[0]),
                     "fisher_samples": min(config.fisher_samples, int(calib_ids.shape[0])),
                     "hessian_inputs": "full precision", "kl_top_k": run.eval.kl.top_k,
                     "kl_tail_samples": run.eval.kl.tail_samples},
        "reference": {"ppl": reference.ppl, "window_nll": reference.window_nll},
        "seconds": seconds, "units": units,
    }
