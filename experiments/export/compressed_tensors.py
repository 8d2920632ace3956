"""compressed-tensors `pack-quantized`: the checkpoint llm-compressor writes and vLLM / transformers load.

Per quantized linear `<name>` (compressed-tensors' PackedQuantizationCompressor layout):
- `<name>.weight_packed` int32 [out, ceil(in * b / 32)]: per row, the signed values q = code - 2^(b-1)
  offset back by 2^(b-1) (so: our unsigned codes) as one dense LSB-first bitstream, exactly
  kernels/packing.py's rows (for 4 and 8 bits every compressed-tensors version packs the same way);
- `<name>.weight_scale` [out, n_groups] ([out, 1] per channel) in the model's dtype, as
  llm-compressor stores them (an fp32 model keeps the method's fp32 scales, so the reloaded weights
  are the fake-quant ones bit for bit; fp16 / bf16 models round them);
- `<name>.weight_zero_point` (asymmetric only) int32, the signed zero-points z - 2^(b-1) packed
  the same way along the output dimension: [ceil(out * b / 32), n_groups];
- `<name>.weight_shape` int64 [2];
- `<name>.weight_g_idx` int32 [in], only for act-order with dynamic groups (`actorder: "group"`).
Dequantization there is (q - zp) * scale = (code - zero) * scale: our weight.

Schemes. One config group per distinct (bits, symmetric, strategy, group size, act-order), its
`targets` the exact module names. compressed-tensors needs the group size to divide the width; a
layer whose last group is short is written at a group size that divides both
(experiments/export/grids.py), each scale repeated: the same weights, more scales. Where all
layers share bits and symmetry, one group size serves the whole model (the gcd), so that there is
one scheme: transformers' dequantizing loader applies the first scheme to every layer.

Act-order with dynamic groups is written as compressed-tensors defined it (`actorder: "group"` and
`weight_g_idx`, what llm-compressor wrote and vLLM loaded); compressed-tensors 0.20 removed that
option and refuses to read such a config, so the export says so when it writes one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from quantlab.experiments.export.grids import common_group_size, dividing_group_size, regrouped
from quantlab.experiments.export.source import SavedModel
from quantlab.kernels.packing import pack_codes
from quantlab.kernels.uniform import UniformWeight

NAME = "compressed-tensors"
WEIGHTS = "model.safetensors"
ACTORDER_NOTE = (
    "layers with act-order dynamic groups are written with actorder='group' and weight_g_idx; "
    "compressed-tensors >= 0.20 no longer reads that option (vLLM and compressed-tensors releases "
    "before it do)"
)


def _scheme(fmt: UniformWeight, group_size: int | None = None) -> tuple[tuple, dict[str, Any]]:
    """(key, weights args) of a layer written at `group_size` (None: its own dividing group size)."""
    symmetric = fmt.zero_format == "none"
    explicit = fmt.g_idx_layout == "explicit"
    if explicit:
        group_size = fmt.group_size
    elif group_size is None:
        group_size = dividing_group_size(fmt)
    strategy = "channel" if group_size == -1 else "group"
    args: dict[str, Any] = {
        "num_bits": fmt.bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
        "group_size": None if strategy == "channel" else group_size, "dynamic": False,
        "observer": "minmax",  # informational: the weights are already quantized
    }
    if explicit:
        args["actorder"] = "group"
    return (fmt.bits, symmetric, strategy, group_size, explicit), args


def group_sizes(formats: dict[str, UniformWeight]) -> dict[str, int]:
    """The group size each layer is written at: one for the whole model where the layers allow it
    (the gcd of their dividing group sizes), since transformers' dequantizing loader applies the
    first scheme to every layer; each layer's own otherwise. Act-order layers keep theirs (g_idx)."""
    plain = {name: fmt for name, fmt in formats.items() if fmt.g_idx_layout != "explicit"}
    kinds = {(fmt.bits, fmt.zero_format == "none") for fmt in plain.values()}
    common = common_group_size(plain) if len(kinds) == 1 else None
    return {name: (fmt.group_size if name not in plain else common if common is not None else dividing_group_size(fmt))
            for name, fmt in formats.items()}


def layer_tensors(
    fmt: UniformWeight, group_size: int | None = None, scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The compressed tensors of one linear (module docstring), keyed without the module name."""
    key, args = _scheme(fmt, group_size)
    bits, symmetric, group_size, explicit = fmt.bits, key[1], key[3], key[4]
    stored = fmt.rounded_to_storage()  # validated, codes as stored
    if explicit:
        scales, zeros = fmt.scales, fmt.zeros
    else:
        scales, zeros = regrouped(fmt, group_size)
    tensors = {
        "weight_packed": pack_codes(stored.codes, bits),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(list(fmt.shape), dtype=torch.int64),
    }
    if not symmetric:
        tensors["weight_zero_point"] = pack_codes(zeros.round().to(torch.int64).T.contiguous(), bits).T.contiguous()
    if explicit:
        tensors["weight_g_idx"] = fmt.g_idx.to(torch.int32).contiguous()
    return tensors


def quantization_config(formats: dict[str, UniformWeight], sizes: dict[str, int] | None = None) -> dict[str, Any]:
    sizes = sizes or group_sizes(formats)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, fmt in formats.items():
        key, args = _scheme(fmt, sizes[name])
        entry = groups.setdefault(key, {"targets": [], "weights": args, "input_activations": None,
                                        "output_activations": None, "format": "pack-quantized"})
        entry["targets"].append(name)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": entry for i, entry in enumerate(groups.values())},
        "ignore": [],  # only the listed targets are quantized
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def model_dtype(hf_config: dict[str, Any]) -> torch.dtype:
    """The saved model's dtype (config.json), fp16 when it names none."""
    name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name, torch.float16)


def write(saved: SavedModel, out: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    formats: dict[str, UniformWeight] = saved.formats  # type: ignore[assignment]  (refusals ran before)
    tensors: dict[str, torch.Tensor] = {key: value.contiguous() for key, value in saved.dense.items()}
    sizes = group_sizes(formats)
    scale_dtype = model_dtype(saved.hf_config)
    for name, fmt in formats.items():
        for key, value in layer_tensors(fmt, sizes[name], scale_dtype).items():
            tensors[f"{name}.{key}"] = value.cpu()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    config = dict(saved.hf_config)
    config["quantization_config"] = quantization_config(formats, sizes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    saved.copy_tokenizer(out)
    notes = []
    if any(fmt.g_idx_layout == "explicit" for fmt in formats.values()):
        notes.append(ACTORDER_NOTE)
    regrouped_layers = sum(1 for name, fmt in formats.items() if sizes[name] not in (fmt.group_size, -1))
    if regrouped_layers:
        notes.append(
            f"{regrouped_layers} layers are written at group size {sorted(set(sizes.values()))} instead of "
            f"{sorted({fmt.group_size for fmt in formats.values()})}, each scale repeated (the same weights): "
            "compressed-tensors needs the group size to divide every width"
        )
    return {"files": [WEIGHTS, "config.json"], "schemes": len(config["quantization_config"]["config_groups"]),
            "scale_dtype": str(scale_dtype).removeprefix("torch."), "notes": notes}
