"""GGUF with ggml's legacy block types, written with gguf-py's writer from our own codes.

A block is 32 consecutive input columns of a row under one fp16 scale d (and, asymmetric, an fp16
minimum m): Q4_0 / Q5_0 hold d and q in [0, 2^b) with x = d * (q - 2^(b-1)); Q4_1 / Q5_1 hold d,
m and x = d * q + m; Q8_0 holds d and a signed q with x = d * q. A group-32 grid maps onto them
exactly: symmetric grids (zero 2^(b-1)) are Q4_0 / Q5_0 / Q8_0 with d = fp16(scale) and q = our
code (Q8_0: code - 128); asymmetric ones (int or float zero-point) are Q4_1 / Q5_1 with
d = fp16(scale) and m = fp16(-scale * zero), since scale * (code - zero) = scale * code + m. Grids
in groups of a multiple of 32 are written block by block with each group's (d, m) repeated.
Codes are never re-fitted: gguf-py's quantizers serve only as the tests' oracle.

Two conventions of llama.cpp are kept so that the bytes are what its own converter and quantizer
write: q_proj / k_proj rows are permuted from the HF rotary layout to GGUF's (convert_hf_to_gguf's
`permute`; transformers' loader undoes it), and a Q4_1 / Q5_1 block whose codes are all 0 stores
d = 0, the only way ggml's quantizer produces all-zero codes (a constant block; the values, m,
are the same either way).

The rest of the file: llama-family hyperparameters from the saved config.json; the tokenizer and
the general.* fields copied from the GGUF file the base model (or its borrowed tokenizer) was read
from; every other tensor (embedding, norms, an untied head) from the saved model, in the source
GGUF's own type and bytes where that dequantizes to exactly the saved values (SmolLM2's Q8_0
embedding), else F32 (1-D tensors, fp32 models) or F16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantlab.experiments.export.grids import regrouped
from quantlab.experiments.export.layout import GGUF_ARCHITECTURES as ARCHITECTURES
from quantlab.experiments.export.layout import ExportRefused
from quantlab.experiments.export.source import SavedModel
from quantlab.kernels.uniform import UniformWeight

FILE = "model.gguf"
BLOCK = 32


def block_type(fmt: UniformWeight):
    """The ggml type of a layer: by width and symmetry."""
    from gguf import GGMLQuantizationType as T

    symmetric = fmt.zero_format == "none"
    types = {(4, True): T.Q4_0, (4, False): T.Q4_1, (5, True): T.Q5_0, (5, False): T.Q5_1, (8, True): T.Q8_0}
    if (fmt.bits, symmetric) not in types:
        raise ExportRefused(f"no GGUF block type for {fmt.bits}-bit {'symmetric' if symmetric else 'asymmetric'} grids")
    return types[(fmt.bits, symmetric)]


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float16).numpy().view(np.uint8).reshape(*values.shape, 2)


def gguf_blocks(fmt: UniformWeight, rows: torch.Tensor | None = None) -> tuple[Any, np.ndarray]:
    """(ggml type, blocks [out, in / 32 * type_size] uint8) of a layer, its rows in the order
    `rows` (default: as they are)."""
    out_features, in_features = fmt.shape
    if in_features % BLOCK:
        raise ExportRefused(f"GGUF rows are whole blocks of {BLOCK} columns; this layer has {in_features}")
    qtype = block_type(fmt)
    try:
        scales, zeros = regrouped(fmt, BLOCK)  # [out, n_blocks]: each block's group
    except ValueError:
        raise ExportRefused(
            "a GGUF block is 32 consecutive columns under one scale; this layer's groups are not runs of "
            "multiples of 32 columns (act-order with dynamic groups, or a group size that is not a multiple of 32)"
        ) from None
    codes = fmt.rounded_to_storage().codes.long()
    if rows is not None:
        codes, scales, zeros = codes[rows], scales[rows], zeros[rows]
    n_blocks = in_features // BLOCK
    q = codes.reshape(out_features, n_blocks, BLOCK)
    scales = scales.float()
    d = scales.clone()
    fields = []
    if qtype.name == "Q8_0":
        fields = [_fp16_bytes(d), (q - 128).to(torch.int8).numpy().view(np.uint8)]
    else:
        if fmt.zero_format != "none":
            m = -(scales * zeros.float()) + 0.0  # + 0.0: a zero minimum is +0, as fp16(min) of ggml's blocks
            d = torch.where((q == 0).all(dim=-1), torch.zeros_like(d), d)
            fields = [_fp16_bytes(d), _fp16_bytes(m)]
        else:
            fields = [_fp16_bytes(d)]
        low = (q & 0xF).to(torch.uint8)
        if fmt.bits == 5:  # the fifth bits, bit j of a little-endian uint32 for value j
            high = ((q >> 4) & 1).to(torch.int64) << torch.arange(BLOCK)
            fields.append(high.sum(dim=-1).to(torch.int64).numpy().astype("<u4").view(np.uint8).reshape(
                out_features, n_blocks, 4))
        fields.append((low[..., :16] | (low[..., 16:] << 4)).numpy())  # value j low, value j + 16 high
    blocks = np.concatenate(fields, axis=-1)
    return qtype, np.ascontiguousarray(blocks.reshape(out_features, -1))


def rotary_rows(out_features: int, n_head: int) -> torch.Tensor:
    """llama.cpp's q / k row order: GGUF row i is HF row rows[i] (convert_hf_to_gguf's permute)."""
    dim = out_features // n_head // 2
    return torch.arange(out_features).reshape(n_head, 2, dim).transpose(1, 2).reshape(-1)


# -- the source GGUF (tokenizer, general.*, tensors the run did not change) ----------------------


def source_gguf(saved: SavedModel) -> tuple[Path | None, bool]:
    """(the GGUF file the saved model's tokenizer came from, whether it is also its base model)."""
    from quantlab.experiments.models.loading import package_gguf_path
    from quantlab.experiments.store.cache import file_sha256

    base = saved.quantization.get("base_model") or {}
    for spec, is_base in ((base.get("spec"), True), (base.get("tokenizer_spec"), False)):
        if not spec:
            continue
        if spec.get("source") == "package_gguf":
            path = package_gguf_path()
        elif spec.get("source") == "gguf" and spec.get("path"):
            path = Path(spec["path"]).expanduser()
        else:
            continue
        if not path.is_file():
            continue
        if is_base:  # the file must be the one the run read (its hash is in the fingerprint)
            fingerprint = str(base.get("fingerprint", ""))
            is_base = fingerprint.endswith(f"sha256={file_sha256(path)[:16]}")
        return path, is_base
    return None, False


def _copy_field(writer: Any, field: Any) -> None:
    from gguf import GGUFValueType

    vtype = field.types[0]
    if vtype == GGUFValueType.ARRAY:
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=field.types[-1])
    else:
        writer.add_key_value(field.name, field.contents(), vtype)


def _hyperparameters(writer: Any, hf: dict[str, Any]) -> None:
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = hf.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or hf.get("rope_scaling"):
        raise ExportRefused(f"rope scaling {rope or hf.get('rope_scaling')} is not written to GGUF here; only plain rotary")
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(hf["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(hf["vocab_size"])
    if head_dim != hf["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write(saved: SavedModel, out: Path) -> dict[str, Any]:
    import gguf

    hf = saved.hf_config
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportRefused(
            f"GGUF export maps the tensors and metadata of {', '.join(ARCHITECTURES)} models; this one is "
            f"{model_type!r}: export compressed-tensors or gptq"
        )
    source, source_is_base = source_gguf(saved)
    if source is None:
        raise ExportRefused(
            "GGUF export copies the tokenizer from the GGUF file the base model (or its tokenizer) was read "
            "from, and this model's came from elsewhere; building a GGUF tokenizer is llama.cpp's "
            "convert_hf_to_gguf.py's job, not gguf-py's: export compressed-tensors or gptq"
        )
    reader = gguf.GGUFReader(source)
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, hf["num_hidden_layers"])
    writer = gguf.GGUFWriter(out / FILE, gguf.MODEL_ARCH_NAMES[arch])

    for field in reader.fields.values():
        if field.name.startswith("tokenizer.") or (
            source_is_base and field.name.startswith("general.") and field.name not in (
                "general.architecture", "general.file_type", "general.quantization_version")
        ):
            _copy_field(writer, field)
    if not source_is_base:
        writer.add_name(str(hf.get("_model_name_or_path") or saved.quantization.get("base_model", {}).get(
            "spec", {}).get("name", "quantlab export")))
    _hyperparameters(writer, hf)
    writer.add_string("quantlab.method", saved.method)

    def gguf_name(key: str) -> str:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportRefused(f"no GGUF name for tensor {key!r} of a {model_type} model")
        return name

    types: dict[str, int] = {}
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    for name, fmt in saved.formats.items():
        rows = None
        if name.endswith("self_attn.q_proj"):
            rows = rotary_rows(fmt.shape[0], heads)
        elif name.endswith("self_attn.k_proj"):
            rows = rotary_rows(fmt.shape[0], kv_heads)
        try:
            qtype, blocks = gguf_blocks(fmt, rows)  # type: ignore[arg-type]
        except ExportRefused as error:
            raise ExportRefused(f"cannot export {name} as gguf: {error}") from None
        writer.add_tensor(gguf_name(f"{name}.weight"), blocks, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    source_tensors = {t.name: t for t in reader.tensors} if source_is_base else {}
    copied = []
    for key, value in saved.dense.items():
        if key.removesuffix(".bias") in saved.formats:
            raise ExportRefused(f"{key}: linear biases are not part of the llama GGUF layout")
        target = gguf_name(key)
        original = source_tensors.get(target)
        if original is not None and _same_values(original, value):
            writer.add_tensor(target, np.asarray(original.data), raw_dtype=original.tensor_type)
            copied.append(target)
        elif value.ndim == 1 or value.dtype == torch.float32:
            writer.add_tensor(target, value.float().numpy())
        else:
            writer.add_tensor(target, value.to(torch.float16).numpy())
    main = max(types, key=types.get)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{main}"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    copied_types: dict[str, int] = {}
    for name in copied:
        kind = source_tensors[name].tensor_type.name
        copied_types[kind] = copied_types.get(kind, 0) + 1
    return {"files": [FILE], "gguf_types": types, "tokenizer_from": str(source),
            "copied_from_source": copied_types, "embedding_copied": "token_embd.weight" in copied}


def _same_values(original: Any, value: torch.Tensor) -> bool:
    """Whether a source GGUF tensor dequantizes to exactly the saved tensor."""
    from gguf import quants

    data = quants.dequantize(np.asarray(original.data), original.tensor_type)
    if data.size != value.numel():
        return False
    return torch.equal(torch.from_numpy(np.array(data, dtype=np.float32).reshape(value.shape)), value.float())
