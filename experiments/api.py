"""The Python API: quantize an in-memory transformers model without Hydra, then evaluate or save it.

    from quantlab.experiments import quantize, perplexity, save, load
    report = quantize(model, "gptq", bits=4, group_size=128, calibration=ids, act_order=True)
    perplexity(model, windows).value, report.avg_bits
    save(model, report, "out/", tokenizer)
    model, tokenizer, info = load("out/")

The same pieces a run uses, without its config files: the method registry and config checks
(methods/, experiments/run/schema.py), the architecture adapters (a table, or one derived from the
model), the block driver (experiments/run/pipeline.py), the perplexity of
experiments/evaluation/perplexity.py and the saved-model folder of experiments/models/quantized.py.
Calibration and evaluation data are token-id tensors [n, seqlen] the caller makes (with its
tokenizer, from any text); nothing is cached, recorded or read from the hub here.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.experiments.evaluation.perplexity import PerplexityResult
from quantlab.experiments.models.adapters import resolve_architecture
from quantlab.experiments.run.pipeline import QuantizationReport, quantize_model
from quantlab.methods.base import ConfigError

__all__ = ["QuantizationReport", "load", "perplexity", "quantize", "save"]


def quantize(
    model: nn.Module, method: str = "gptq", *, bits: int = 4, group_size: int = 128,
    calibration: torch.Tensor | None = None, batch_size: int = 8, device: str | torch.device | None = None,
    progress: bool = False, **knobs: Any,
) -> QuantizationReport:
    """Quantize every decoder linear of `model` in place (fake-quant weights, the papers' protocol)
    with `method` at `bits` / `group_size` and the method's other `knobs` (as `method.<knob>` in a
    run: GPTQ's `act_order`, `damp`, ...). `calibration`: token ids [n, seqlen], required by methods
    that run the model (all but rtn, fp16 and the data-free baselines). `device`: where each block
    is computed (default: where the model is). Returns the report: per-layer records, exact
    `avg_bits`, the weight formats `save` writes."""
    instance = _method(method, bits, group_size, knobs)
    arch = resolve_architecture(model)
    if instance.needs_calibration and calibration is None:
        raise ConfigError(
            f"method {method!r} runs the model on calibration data: pass calibration=<token ids [n, seqlen]>"
        )
    if calibration is not None:
        _check_ids(model, calibration, "calibration")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer")
    compute = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.no_grad():
        return quantize_model(model, arch, instance, calibration, compute, batch_size, progress=progress)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Perplexity over token windows [n, seqlen] (each window alone, positions 1..L-1 predicted),
    with its 95% interval and the per-window NLLs (`.value`, `.ci_low`, `.ci_high`, `.window_nll`)."""
    from quantlab.experiments.evaluation.perplexity import perplexity as windows_perplexity

    _check_ids(model, windows, "windows")
    return windows_perplexity(model, resolve_architecture(model), windows, batch_size, progress)


def save(model: nn.Module, report: QuantizationReport, path: str | Path, tokenizer: Any = None) -> Path:
    """Write the quantized `model` (its linears as `report`'s packed formats, every other parameter
    as is) with quantization.json and the config (and `tokenizer`) into the folder `path`; `load`
    reads it back alone."""
    from quantlab.experiments.models.quantized import save_quantized_model
    from quantlab.experiments.store.artifacts import describe_report

    if not report.formats:
        raise ValueError(f"the report holds no quantized weights (method {report.method!r}): nothing to save")
    missing = [name for name in report.formats if not isinstance(model.get_submodule(name), nn.Linear)]
    if missing:
        raise ValueError(f"{missing[:3]} are not linears of this model: save the model the report was made on")
    description = describe_report(report, report.method, report.method_config, report.seconds)
    # not in config.json: without it a model quantized under eager attention reloads under sdpa
    description["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    return save_quantized_model(model, report.formats, Path(path), tokenizer, description)


def load(path: str | Path, backend: str = "fake", device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer or None, quantization.json) from a folder `save` (or a run's save_model)
    wrote. `backend`: "fake" (dense dequantized weights, bit for bit the in-memory model) or
    "packed" (QuantLinear modules holding the low-bit tensors)."""
    from quantlab.experiments.models.quantized import load_quantized_model

    model, tokenizer, info = load_quantized_model(Path(path), device=device, backend=backend)
    if info.get("attn_implementation"):  # the attention the model was quantized and evaluated with
        model.set_attn_implementation(info["attn_implementation"])
    return model, tokenizer, info


def _method(name: str, bits: int, group_size: int, knobs: dict[str, Any]):
    """The registered method `name` with a validated config; unknown names and knobs are refused
    with the valid ones (and the closest match) named."""
    from quantlab.experiments.run import allocation_files
    from quantlab.experiments.run.schema import validate_method
    from quantlab.methods import get_method_class

    method_class = get_method_class(name)  # an unknown name lists the valid ones
    if method_class.runtime is not None:
        raise ConfigError(
            f"method {name!r} runs in {method_class.runtime} on an exported graph, not block by block; "
            "use the quantlab CLI for it"
        )
    valid = [f for f in method_class.config_class.field_names() if f not in ("bits", "group_size")]
    for knob in knobs:
        if knob not in valid:
            close = difflib.get_close_matches(knob, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"method {name!r} has no knob {knob!r}{hint}; its knobs: {', '.join(valid)} (and bits, group_size)"
            )
    _, config = validate_method({"name": name, "bits": bits, "group_size": group_size, **knobs})
    method = method_class(config)
    allocation_files.attach(method)  # SliM-LLM's allocation=PATH: read now, as a run does
    return method


def _check_ids(model: nn.Module, ids: torch.Tensor, what: str) -> None:
    """Token ids [n >= 1, seqlen >= 2] of integer dtype, inside the model's vocabulary."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a tensor of token ids [n, seqlen] (n >= 1, seqlen >= 2), got {shape}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"{what} holds token ids in [{int(ids.min())}, {int(ids.max())}], outside the model's vocabulary "
            f"[0, {vocab}); tokenize with the model's own tokenizer"
        )
