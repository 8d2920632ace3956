"""The AutoGPTQ / GPTQModel checkpoint, and AutoAWQ's GEMM layout.

GPTQ, per quantized linear `<name>` (AutoGPTQ's QuantLinear buffers):
- `qweight` int32 [in * b / 32, out]: each output column's codes along the input dimension as one
  dense LSB-first bitstream (3-bit codes straddle words exactly as AutoGPTQ's 3-bit packer puts
  them), i.e. our row bitstream of the [out, in] codes, transposed;
- `qzeros` int32 [n_groups, out * b / 32]: the zero-points of each group along the output dimension,
  the same packing. v1 (`checkpoint_format: gptq`, what AutoGPTQ wrote and every loader reads)
  stores zero - 1 (reference/methods.md §3.4, §11.4: a symmetric 4-bit grid stores 7, not 8); a
  zero-point of 0 then cannot be stored (it would wrap to 2^b - 1 and read back as 2^b), so such
  weights are refused in v1 and written in v2 (`gptq_v2`, GPTQModel's true zero-points);
- `scales` fp16 [n_groups, out]; `g_idx` int32 [in] (j // group_size, or act-order's groups);
- `bias` (when the linear has one).
`quantize_config.json` (and `quantization_config` in config.json): bits, group_size, sym, desc_act
(true when a layer's groups are not contiguous), checkpoint_format. One bits / group size / sym for
the whole model; a short last group is what AutoGPTQ itself writes (n_groups = ceil(in / g)).

AWQ GEMM (AutoAWQ's WQLinear_GEMM, `version: gemm`): `qweight` int32 [in, out / 8] packing 8
output columns per word in the order (0, 2, 4, 6, 1, 3, 5, 7), `qzeros` [n_groups, out / 8] the
same (true zero-points, no minus one), `scales` fp16 [n_groups, out]; groups of `q_group_size`
consecutive input rows, which must divide every width: a short last group is re-expressed at a
dividing group size (experiments/export/grids.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from quantlab.experiments.export.grids import common_group_size, regrouped
from quantlab.experiments.export.layout import ExportRefused
from quantlab.experiments.export.source import SavedModel
from quantlab.kernels.packing import pack_codes
from quantlab.kernels.uniform import UniformWeight

WEIGHTS = "model.safetensors"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _int_zeros(fmt: UniformWeight) -> torch.Tensor:
    """[out, n_groups] integer zero-points (symmetric grids: the implicit 2^(b-1))."""
    return fmt.rounded_to_storage().zeros.round().to(torch.int64)


def _uniform(formats: dict[str, UniformWeight], what: str) -> tuple[int, int, bool]:
    """(bits, group_size, sym) shared by every layer, or ExportRefused."""
    kinds = {(fmt.bits, fmt.group_size, fmt.zero_format == "none") for fmt in formats.values()}
    if len(kinds) > 1:
        raise ExportRefused(
            f"{what} holds one bits / group_size / sym for the whole model; these layers differ: {sorted(kinds)}"
        )
    return next(iter(kinds))


def gptq_tensors(fmt: UniformWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    out_features, in_features = fmt.shape
    bits = fmt.bits
    for what, width in (("input", in_features), ("output", out_features)):
        if width * bits % 32:
            raise ExportRefused(
                f"GPTQ packs {bits}-bit values 32 bits at a time along the {what} dimension; {width} {what} "
                f"features x {bits} bits is not a whole number of words"
            )
    zeros = _int_zeros(fmt)
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise ExportRefused(
                "GPTQ v1 checkpoints store zero-point - 1, and some zero-points are 0 (a group without "
                "negative weights): they cannot be stored; export with checkpoint_format gptq_v2 (GPTQModel "
                "reads it), or compressed-tensors"
            )
        zeros = zeros - 1
    stored = fmt.rounded_to_storage()
    return {
        "qweight": pack_codes(stored.codes, bits).T.contiguous(),
        "qzeros": pack_codes(zeros.T.contiguous(), bits),
        "scales": fmt.scales.T.to(torch.float16).contiguous(),
        "g_idx": fmt.g_idx.to(torch.int32).contiguous(),
    }


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit values -> [rows, cols / 8] int32 words in AutoAWQ's column order."""
    rows, cols = values.shape
    if cols % 8:
        raise ExportRefused(f"AutoAWQ's GEMM layout packs 8 output features per word; {cols} is not a multiple of 8")
    ordered = values.reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]  # nibble i holds column AWQ_ORDER[i]
    return pack_codes(ordered.reshape(rows, cols), 4)


def awq_tensors(fmt: UniformWeight, group_size: int) -> dict[str, torch.Tensor]:
    scales, zeros = regrouped(fmt, group_size)
    stored = fmt.rounded_to_storage()
    return {
        "qweight": _pack_awq(stored.codes.T.contiguous().long()),
        "qzeros": _pack_awq(zeros.round().to(torch.int64).T.contiguous()),
        "scales": scales.T.to(torch.float16).contiguous(),
    }


def _write(saved: SavedModel, out: Path, layer_tensors: dict[str, dict[str, torch.Tensor]],
           quant: dict[str, Any], config_name: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    tensors = {key: value.contiguous() for key, value in saved.dense.items()}
    for name, layer in layer_tensors.items():
        for key, value in layer.items():
            tensors[f"{name}.{key}"] = value.cpu()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    config = dict(saved.hf_config)
    config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / config_name).write_text(json.dumps(quant, indent=2) + "\n")
    saved.copy_tokenizer(out)
    return {"files": [WEIGHTS, "config.json", config_name], "quantization_config": quant}


def write_gptq(saved: SavedModel, out: Path, checkpoint_format: str = "gptq") -> dict[str, Any]:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ExportRefused(f"checkpoint_format={checkpoint_format!r}; choose one of: {', '.join(CHECKPOINT_FORMATS)}")
    formats: dict[str, UniformWeight] = saved.formats  # type: ignore[assignment]
    bits, group_size, sym = _uniform(formats, "a GPTQ quantize_config")
    layers = {}
    for name, fmt in formats.items():
        try:
            layers[name] = gptq_tensors(fmt, checkpoint_format)
        except ExportRefused as error:
            raise ExportRefused(f"cannot export {name} as gptq: {error}") from None
    method_config = saved.quantization.get("method_config") or {}
    quant = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
        "desc_act": any(fmt.g_idx_layout == "explicit" for fmt in formats.values()),
        "static_groups": bool(method_config.get("static_groups", False)),
        "damp_percent": method_config.get("damp", 0.01),
        "true_sequential": method_config.get("true_sequential") is not False,
        "checkpoint_format": checkpoint_format,
        "model_file_base_name": "model",
        "meta": {"quantizer": ["quantlab"], "method": saved.method},
    }
    return _write(saved, out, layers, quant, "quantize_config.json")


def write_awq(saved: SavedModel, out: Path) -> dict[str, Any]:
    formats: dict[str, UniformWeight] = saved.formats  # type: ignore[assignment]
    _uniform(formats, "an AWQ quant_config")
    group_size = common_group_size(formats)
    layers = {name: awq_tensors(fmt, group_size) for name, fmt in formats.items()}
    quant = {"quant_method": "awq", "zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "gemm",
             "modules_to_not_convert": None}
    summary = _write(saved, out, layers, quant, "quant_config.json")
    own = {fmt.group_size for fmt in formats.values()}
    if own != {group_size}:
        summary["notes"] = [f"written at q_group_size {group_size} instead of {sorted(own)}, each scale repeated (the "
                            "same weights): AutoAWQ needs the group size to divide every width"]
    return summary
