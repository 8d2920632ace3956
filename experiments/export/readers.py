"""Independent readers of the exported layouts: the dense weights another loader would compute.

Written from the loaders' own dequantization (compressed-tensors' `unpack_from_int32` +
`dequantize`, AutoGPTQ's `QuantLinear` dequant with its `zeros + 1`, AutoAWQ's reverse nibble
order), sharing no code with the writers: bitstreams are expanded to single bits here, not
unpacked with kernels/packing.py. Tests and the export evidence use them as oracles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[rows, n_words] int32 -> [rows, n] int64: value j is stream bits [j*b, (j+1)*b), LSB first,
    stream bit t being bit t % 32 of word t // 32 (the dense layout all three formats use)."""
    words = words.to(torch.int64) & 0xFFFFFFFF
    stream = (words[..., None] >> torch.arange(32)) & 1  # [rows, n_words, 32]
    stream = stream.reshape(words.shape[0], -1)[:, : n * bits].reshape(words.shape[0], n, bits)
    return (stream << torch.arange(bits)).sum(dim=-1)


def _load(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return config, tensors


def read_compressed_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """{linear: dense fp32 weight} of a pack-quantized checkpoint: (q - zp) * scale per group."""
    config, tensors = _load(Path(folder))
    out = {}
    for group in config["quantization_config"]["config_groups"].values():
        args = group["weights"]
        bits = args["num_bits"]
        for name in group["targets"]:
            rows, cols = (int(v) for v in tensors[f"{name}.weight_shape"])
            q = unpack_bits(tensors[f"{name}.weight_packed"], bits, cols)
            scale = tensors[f"{name}.weight_scale"].float()
            if args["symmetric"]:
                zero = torch.full_like(scale, 2 ** (bits - 1))
            else:
                zero = unpack_bits(tensors[f"{name}.weight_zero_point"].T.contiguous(), bits, rows).T.float()
            if f"{name}.weight_g_idx" in tensors:
                group_of = tensors[f"{name}.weight_g_idx"].long()
            elif args["strategy"] == "channel":
                group_of = torch.zeros(cols, dtype=torch.long)
            else:
                group_of = torch.arange(cols) // args["group_size"]
            out[name] = (q.float() - zero[:, group_of]) * scale[:, group_of]
    return out


def read_gptq(folder: Path) -> dict[str, torch.Tensor]:
    """{linear: dense fp32 weight} of an AutoGPTQ / GPTQModel checkpoint: qweight packed along the
    input dimension, qzeros along the output dimension, v1 zeros stored minus one."""
    config, tensors = _load(Path(folder))
    quant = config["quantization_config"]
    bits = quant["bits"]
    v1 = quant.get("checkpoint_format", "gptq") == "gptq"
    out = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        scales = tensors[f"{name}.scales"].float()  # [n_groups, out]
        n_groups, out_features = scales.shape
        g_idx = tensors[f"{name}.g_idx"].long()
        in_features = g_idx.numel()
        weight = unpack_bits(tensors[key].T.contiguous(), bits, in_features).T  # [in, out]
        zeros = unpack_bits(tensors[f"{name}.qzeros"], bits, out_features)  # [n_groups, out], masked
        if v1:
            zeros = zeros + 1  # AutoGPTQ's dequant: the stored zero is the true one minus one
        dense = scales[g_idx] * (weight - zeros[g_idx]).float()  # [in, out]
        out[name] = dense.T.contiguous()
    return out


def read_awq(folder: Path) -> dict[str, torch.Tensor]:
    """{linear: dense fp32 weight} of an AutoAWQ GEMM checkpoint: qweight [in, out / 8] and qzeros
    [n_groups, out / 8] with AutoAWQ's nibble order, scales [n_groups, out], groups of q_group_size rows."""
    config, tensors = _load(Path(folder))
    group_size = config["quantization_config"]["q_group_size"]
    out = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")

        def unpack(words: torch.Tensor) -> torch.Tensor:
            nibbles = unpack_bits(words, 4, words.shape[1] * 8).reshape(words.shape[0], -1, 8)
            columns = torch.empty_like(nibbles)
            columns[..., list(AWQ_ORDER)] = nibbles  # nibble i is column AWQ_ORDER[i]
            return columns.reshape(words.shape[0], -1)

        weight = unpack(tensors[key])  # [in, out]
        zeros = unpack(tensors[f"{name}.qzeros"])  # [n_groups, out]
        scales = tensors[f"{name}.scales"].float()
        group_of = torch.arange(weight.shape[0]) // (weight.shape[0] if group_size == -1 else group_size)
        out[name] = ((weight - zeros[group_of]).float() * scales[group_of]).T.contiguous()
    return out


def decode_gguf_blocks(raw, type_name: str) -> dict:
    """ggml blocks [n, type_size] uint8 (numpy) -> {"d": fp16 [n], "m": fp16 [n] or None, "q": int64
    [n, 32]}, q as ggml stores it (Q8_0: signed). Read from ggml's block structs (block_q4_0 ...)."""
    import numpy as np

    raw = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1])
    d = raw[:, :2].copy().view(np.float16)[:, 0]
    if type_name == "Q8_0":
        return {"d": d, "m": None, "q": raw[:, 2:].copy().view(np.int8).astype(np.int64)}
    offset, m, high = 2, None, None
    if type_name in ("Q4_1", "Q5_1"):
        m = raw[:, 2:4].copy().view(np.float16)[:, 0]
        offset = 4
    if type_name in ("Q5_0", "Q5_1"):
        qh = raw[:, offset:offset + 4].copy().view(np.uint32)[:, 0]
        high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64)
        offset += 4
    qs = raw[:, offset:offset + 16].astype(np.int64)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1)  # value j in the low nibble of byte j, j + 16 in the high
    return {"d": d, "m": m, "q": q if high is None else q | (high << 4)}
