"""Quantized models on disk: save, reload, and apply a set of weight formats to a model.

A saved quantized model is a folder (like llm-compressor's recipe beside a checkpoint):

- `weights.safetensors`: each quantized linear's packed tensors (kernels/: bit-packed codes,
  fp16 scales, ...) under `<linear>.<tensor>`, its bias under `<linear>.bias`, and every other
  parameter of the model (embeddings, norms, an untied head) at the model's dtype. This file is
  the deployable model: its size is the measured `artifact_bytes`.
- `exact.safetensors`: the fp32 values the method computed for what the packed file holds in
  fp16 (scales, float zero-points, centroids, fp16 columns), only where rounding changed them.
  The fake-quant model (the papers' protocol, the default evaluation) is rebuilt bit for bit from
  both files; the packed model uses the first alone. Not part of the deployable size.
- `quantization.json`: the format version, the base model (spec and fingerprint), the method and
  its config, the calibration record, per linear its format `meta()` and its layer record, and
  the quantization timings.
- `config.json` and the tokenizer files (so `load_quantized_model` needs nothing else), and
  `run_config.json` (the resolved run config that produced it).

`apply_formats(model, formats, backend)` puts formats into a full-precision model: "fake" writes
each dequantized weight into its nn.Linear; "packed" swaps in a `quantlab.kernels.linear.QuantLinear`.
"""

from __future__ import annotations

import json
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.experiments.store.cache import atomic_write_json, file_sha256
from quantlab.kernels.format import WeightFormat, format_from_packed

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
EXACT_FILE = "exact.safetensors"
QUANT_CONFIG_FILE = "quantization.json"
RUN_CONFIG_FILE = "run_config.json"
BACKENDS = ("fake", "packed")


class NotAQuantizedModel(FileNotFoundError):
    pass


def _float_fields(fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """The floating-point tensor fields of a format (dataclass), which packing may round."""
    if not is_dataclass(fmt):
        return {}
    out = {}
    for f in fields(fmt):
        value = getattr(fmt, f.name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out[f.name] = value
    return out


def _exact_sidecar(fmt: WeightFormat) -> dict[str, torch.Tensor]:
    """Float fields whose stored (fp16) copy differs from the computed one, at full precision."""
    stored = _float_fields(fmt.rounded_to_storage())
    return {
        name: value.detach().float().contiguous()
        for name, value in _float_fields(fmt).items()
        if name in stored and not torch.equal(stored[name].float(), value.float())
    }


def save_quantized_model(
    model: nn.Module,
    formats: dict[str, WeightFormat],
    directory: Path,
    tokenizer: Any = None,
    description: dict[str, Any] | None = None,
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Write `model` with its quantized linears replaced by `formats` (full module names) into
    `directory` (see the module docstring). `description` goes into quantization.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    exact: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, fmt in formats.items():
        for key, value in fmt.pack().items():
            tensors[f"{name}.{key}"] = value.cpu()
        for key, value in _exact_sidecar(fmt).items():
            exact[f"{name}.{key}"] = value.cpu()
        layers[name] = fmt.meta()
        bias = model.get_submodule(name).bias
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().cpu().contiguous()
    quantized_weights = {f"{name}.weight" for name in formats}
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict().items():
        if key in quantized_weights or key.removesuffix(".bias") in formats:
            continue
        pointer = value.data_ptr()
        if pointer in seen:  # tied (the head shares the embedding): stored once
            tied[key] = seen[pointer]
            continue
        seen[pointer] = key
        tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "quantlab", "version": str(FORMAT_VERSION)})
    if exact:
        save_file(exact, str(directory / EXACT_FILE))
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if run_config is not None:
        atomic_write_json(directory / RUN_CONFIG_FILE, run_config)
    files = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
        for name in (WEIGHTS_FILE, EXACT_FILE)
        if (directory / name).is_file()
    }
    atomic_write_json(  # last: a folder without it is not a saved model
        directory / QUANT_CONFIG_FILE,
        {"format_version": FORMAT_VERSION, **(description or {}), "files": files, "tied": tied, "layers": layers},
    )
    return directory


def files_are_intact(directory: Path) -> bool:
    """Whether the tensor files match the sizes and sha256 that quantization.json lists."""
    try:
        files = read_quant_config(directory)["files"]
        return WEIGHTS_FILE in files and all(
            (Path(directory) / name).stat().st_size == entry["bytes"]
            and file_sha256(Path(directory) / name) == entry["sha256"]
            for name, entry in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_quant_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / QUANT_CONFIG_FILE
    if not path.is_file() or not (Path(directory) / WEIGHTS_FILE).is_file():
        raise NotAQuantizedModel(
            f"{directory} is not a saved quantized model (it needs {QUANT_CONFIG_FILE} and {WEIGHTS_FILE}); "
            "save one with save_model=true"
        )
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise NotAQuantizedModel(
            f"{path}: format_version {config.get('format_version')} is not {FORMAT_VERSION}; re-save the model"
        )
    return config


def load_formats(directory: Path, exact: bool = True) -> dict[str, WeightFormat]:
    """Every quantized linear's format; `exact` restores the fp32 values the method computed
    (the fake-quant weights bit for bit), else the weights as stored (the packed model)."""
    from safetensors import safe_open

    directory = Path(directory)
    config = read_quant_config(directory)
    sidecar: dict[str, torch.Tensor] = {}
    if exact and (directory / EXACT_FILE).is_file():
        with safe_open(str(directory / EXACT_FILE), framework="pt") as handle:
            sidecar = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    formats: dict[str, WeightFormat] = {}
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
        keys = list(handle.keys())
        for name, meta in config["layers"].items():
            prefix = f"{name}."
            tensors = {
                key[len(prefix):]: handle.get_tensor(key)
                for key in keys
                if key.startswith(prefix) and key != f"{name}.bias"
            }
            fmt = format_from_packed(tensors, meta)
            restore = {key[len(prefix):]: value for key, value in sidecar.items() if key.startswith(prefix)}
            if restore:
                fmt = replace(fmt, **restore)  # type: ignore[type-var]
            formats[name] = fmt
    return formats


@torch.no_grad()
def apply_formats(
    model: nn.Module, formats: dict[str, WeightFormat], backend: str = "fake", kernel: str = "auto"
) -> dict[str, str]:
    """Put `formats` into `model` in place: "fake" writes each dequantized weight into its linear;
    "packed" replaces the linear by a QuantLinear running `kernel` ("auto": the fast path where the
    format has one). Returns the kernel each linear runs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of: {', '.join(BACKENDS)}")
    if backend == "fake":
        for name, fmt in formats.items():
            linear = model.get_submodule(name)
            linear.weight.data.copy_(fmt.dequantize(torch.float32).to(linear.weight.dtype))
        return {name: "fake" for name in formats}
    from quantlab.kernels.linear import quantize_linears

    quantize_linears(model, formats, kernel)
    return {name: model.get_submodule(name).kernel for name in formats}


@torch.no_grad()
def restore_other_tensors(model: nn.Module, directory: Path, formats: dict[str, WeightFormat]) -> list[str]:
    """Copy what the folder stores besides the quantized linears' packed tensors (norms,
    embeddings, an untied head, the linears' biases) into `model`, so that what a method changed
    outside the linears comes back with the formats: AWQ's and SmoothQuant's scales folded into
    the norms, QAT's trained norms and biases. Returns the names of the tensors that changed."""
    from safetensors import safe_open

    state = model.state_dict()
    changed = []
    with safe_open(str(Path(directory) / WEIGHTS_FILE), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            name, _, leaf = key.rpartition(".")
            if (name in formats and leaf != "bias") or key not in state:
                continue  # a packed tensor of a quantized linear (its weight comes from the format)
            stored = handle.get_tensor(key).to(state[key].device, state[key].dtype)
            if not torch.equal(stored, state[key]):
                state[key].copy_(stored)
                changed.append(key)
    return changed


def load_quantized_model(
    directory: Path, device: str | torch.device = "cpu", backend: str = "packed", kernel: str = "auto",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, quantization.json) from a saved folder alone: the model is built on the
    meta device (no full-precision weights are ever allocated), its other parameters come from
    the file, and its quantized linears become QuantLinear (`packed`) or dense dequantized
    linears (`fake`, exact fp32 values)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    config = read_quant_config(directory)
    hf_config = AutoConfig.from_pretrained(directory)
    dtype = dtype or getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    formats = load_formats(directory, exact=backend == "fake")
    from accelerate import init_empty_weights

    # parameters on the meta device, buffers computed as the modules build them (rotary
    # frequencies, Gemma 2's embedding scale: non-persistent, in no file)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    from quantlab.kernels.linear import QuantLinear

    for name, fmt in formats.items():  # each quantized linear: a module of its own, from its format
        parent_name, _, child = name.rpartition(".")
        bias = state.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.to(dtype)
        if backend == "packed":
            module: nn.Module = QuantLinear.from_format(fmt, bias, backend=kernel, dtype=dtype)
        else:
            module = nn.Linear(fmt.shape[1], fmt.shape[0], bias=bias is not None, device="meta", dtype=dtype)
            module.weight = nn.Parameter(fmt.dequantize(torch.float32).to(dtype), requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias, requires_grad=False)
        setattr(model.get_submodule(parent_name), child, module)
    rest = {key: value for key, value in state.items() if not any(key.startswith(f"{n}.") for n in formats)}
    for key, source in config.get("tied", {}).items():
        rest[key] = rest[source]
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [key for key in missing if key.rpartition(".")[0] not in formats]  # their own modules hold them
    if unexpected:
        raise NotAQuantizedModel(f"{directory}: tensors the model does not have: {unexpected[:5]}")
    if missing:
        raise NotAQuantizedModel(f"{directory}: parameters missing from {WEIGHTS_FILE}: {missing[:5]}")
    if config.get("tied"):
        model.tie_weights()
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer, config
