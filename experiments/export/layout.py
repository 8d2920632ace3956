"""What a run's weights are, as far as another format cares, and the one table of refusals.

`Layout` describes one quantized linear: uniform grid or codebook, width, group size, zero-point
kind (int, float, none = symmetric), whether its groups are contiguous runs of columns or need a
`g_idx` (act-order with dynamic groups), fp16 outlier columns (OWQ), per-group widths (SliM-LLM).
It comes from a saved format (`layout_of`) or, before anything loads, from a method's config
(`predicted_layout`), so that a run with `export=...` is refused before its model loads by the
same rule (`refusal`) that `quantlab-export` applies to the saved weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantlab.kernels.format import WeightFormat
from quantlab.kernels.uniform import UniformWeight
from quantlab.methods.base import ConfigError

EXPORT_FORMATS = ("compressed-tensors", "gptq", "awq", "gguf")
GGUF_ARCHITECTURES = ("llama",)  # HF model_type whose tensors and metadata the GGUF export maps
OWN_FORMAT = "quantlab's own format (save_model=true writes it; model=quantized model.path=... reloads it)"


class ExportRefused(ConfigError):
    """A run's weights cannot be written in the asked format; the message says why and what would."""


@dataclass(frozen=True)
class Layout:
    kind: str  # "uniform" | "codebook" | "lookup" (NF4 / FP4) | "none" (nothing quantized) | "onnx"
    bits: int | None = None
    group_size: int | None = None
    zero_format: str | None = None  # "int" | "float" | "none" (symmetric, implicit zero 2^(b-1))
    g_idx: str = "contiguous"  # "explicit": columns of a group are not one run (act-order, dynamic groups)
    outliers: bool = False
    mixed_widths: bool = False
    binary: bool = False  # SliM-LLM's sign-binarized 1-bit groups


def layout_of(fmt: WeightFormat) -> Layout:
    if not isinstance(fmt, UniformWeight):
        return Layout("lookup" if fmt.format_name == "lookup" else "codebook")
    return Layout(
        "uniform", fmt.bits, fmt.group_size, fmt.zero_format,
        "explicit" if fmt.g_idx_layout == "explicit" else "contiguous",
        outliers=fmt.n_outliers > 0, mixed_widths=fmt.group_bits is not None, binary=fmt.binary_one_bit,
    )


def layout_of_meta(meta: dict[str, Any]) -> Layout:
    """The layout of a saved linear from its quantization.json entry (no tensor read)."""
    if meta.get("format_name") != "uniform":
        return Layout("lookup" if meta.get("format_name") == "lookup" else "codebook")
    return Layout(
        "uniform", meta["bits"], meta["group_size"], meta["zero_format"],
        "explicit" if meta["g_idx_layout"] == "explicit" else "contiguous",
        outliers=meta.get("n_outliers", 0) > 0, mixed_widths=bool(meta.get("mixed_widths")),
        binary=bool(meta.get("binary_one_bit")),
    )


def predicted_layout(method_name: str, config: Any) -> Layout | None:
    """The layout a method's config will produce, for the methods whose output is known from their
    config alone; None for others (their saved weights are checked when the export is written)."""
    bits, group_size = getattr(config, "bits", None), getattr(config, "group_size", None)
    if method_name == "fp16":
        return Layout("none")
    if method_name == "vptq":
        return Layout("codebook")
    if method_name in ("nf4", "fp4"):
        return Layout("lookup")
    if method_name == "onnx_int8":
        return Layout("onnx")
    if method_name == "hqq":  # its own bits / group size; a float zero-point per group
        return Layout("uniform", bits, group_size, "float")
    if method_name == "slim_llm":
        return Layout("uniform", bits, group_size, "int", mixed_widths=True)
    if method_name == "owq":
        return Layout("uniform", bits, group_size, "none" if config.sym else "int", outliers=True)
    if method_name.startswith("gguf_"):
        return Layout("uniform", bits, group_size, "none" if config.block_type.symmetric else "float")
    if method_name == "rtn":
        zero = "float" if config.float_zero else "none" if config.sym else "int"
        return Layout("uniform", bits, group_size, zero)
    if method_name == "gptq":
        dynamic = config.act_order and not config.static_groups and group_size != -1
        return Layout("uniform", bits, group_size, "none" if config.sym else "int",
                      "explicit" if dynamic else "contiguous")
    if method_name == "awq":
        return Layout("uniform", bits, group_size, "int")
    if method_name == "qat":  # its init's grid, trained in place: the init's layout
        return predicted_layout(config.init, config.init_config())
    if method_name == "smoothquant":  # symmetric absmax per channel (its smoothed norms travel with the model)
        return Layout("uniform", bits, group_size, "none")
    return None


def refusal(fmt: str, layout: Layout) -> str | None:
    """Why a linear of this layout cannot be written in format `fmt` and what would work; None
    when it can."""
    if fmt not in EXPORT_FORMATS:
        return f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}"
    if layout.kind == "none":
        return "method fp16 quantizes nothing: there are no quantized weights to export"
    if layout.kind == "onnx":
        return ("method onnx_int8 is quantized and evaluated by ONNX Runtime as an ONNX graph: there is no "
                "quantlab model to export; export a weight-only method (e.g. method=rtn bits=8 group_size=-1)")
    if layout.kind == "lookup":
        return (f"NF4 / FP4 weights are indices into a 16-value table with a scale per block, not a uniform "
                f"grid: {fmt} cannot hold them; they exist only in {OWN_FORMAT} (bitsandbytes' own "
                "serialization is not written here)")
    if layout.kind == "codebook":
        return (f"codebook weights (VPTQ's indices and centroids) exist only in {OWN_FORMAT}: {fmt} holds "
                "uniform grids (a scale per group) only")
    if layout.outliers:
        return (f"OWQ's fp16 outlier columns have no place in {fmt} (every column on the grid); they exist only "
                f"in {OWN_FORMAT}; GPTQ (method=gptq) writes the same grid without them")
    if layout.mixed_widths or layout.binary:
        return (f"SliM-LLM's per-group bit widths have no place in {fmt} (one width per tensor); they exist "
                f"only in {OWN_FORMAT}")
    bits, zero, explicit = layout.bits, layout.zero_format, layout.g_idx == "explicit"
    if fmt == "compressed-tensors":
        if bits not in (4, 8):
            return (f"compressed-tensors pack-quantized is written for int4 and int8 (what vLLM's WNA16 kernels "
                    f"run, and the widths whose packing every compressed-tensors version shares); bits={bits} "
                    "is not: re-run with bits=4 or 8, or export gptq (2, 3, 4, 8 bits)")
        if zero == "float":
            return ("compressed-tensors stores integer zero-points; these weights have a float zero-point "
                    "(method.float_zero=true, or a GGUF Q4_1 / Q5_1 baseline): export gguf, or re-run with an "
                    "integer zero-point")
    elif fmt in ("gptq", "awq"):
        name = "GPTQ (AutoGPTQ / GPTQModel)" if fmt == "gptq" else "AutoAWQ's GEMM layout"
        if zero == "float":
            return (f"{name} stores integer zero-points; these weights have a float zero-point "
                    "(method.float_zero=true, or a GGUF Q4_1 / Q5_1 baseline): export gguf, or re-run with an "
                    "integer zero-point")
        if fmt == "gptq" and bits not in (2, 3, 4, 8):
            return f"GPTQ checkpoints pack 2, 3, 4 or 8 bits; bits={bits} is not one of them"
        if fmt == "awq":
            if bits != 4:
                return f"AutoAWQ's GEMM layout is 4-bit only; bits={bits}: export gptq or compressed-tensors"
            if explicit:
                return ("AutoAWQ's GEMM layout has no g_idx, so act-order with dynamic groups cannot be written: "
                        "export gptq (desc_act) or compressed-tensors, or re-run with method.static_groups=true")
    elif fmt == "gguf":
        if bits not in (4, 5, 8):
            return (f"GGUF's block types with one scale per 32 values are Q4_0 / Q4_1 (4 bits), Q5_0 / Q5_1 (5) "
                    f"and Q8_0 (8); bits={bits} has none")
        if bits == 8 and zero != "none":
            return ("8-bit GGUF weights are Q8_0, a symmetric grid; these are asymmetric (Q8_1 is ggml's "
                    "activation type, not a weight type): re-run with method.sym=true, or export compressed-tensors")
        if explicit:
            return ("a GGUF block is 32 consecutive columns under one scale; act-order with dynamic groups gives "
                    "columns of one block different groups: re-run with method.static_groups=true (act-order "
                    "with contiguous groups) or method.act_order=false, or export gptq / compressed-tensors, "
                    "which carry g_idx")
        if layout.group_size is not None and layout.group_size != -1 and layout.group_size % 32:
            return (f"a GGUF block is 32 consecutive columns under one scale; group_size={layout.group_size} puts "
                    "several groups in one block: re-run with group_size=32 (or a multiple of 32)")
    return None


def refuse_all(fmt: str, layouts: dict[str, Layout]) -> None:
    """Raise ExportRefused naming the first linear that cannot be written (and how many cannot)."""
    problems = {name: why for name, layout in layouts.items() if (why := refusal(fmt, layout)) is not None}
    if problems:
        name, why = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} other linears)" if len(problems) > 1 else ""
        raise ExportRefused(f"cannot export {name}{more} as {fmt}: {why}")
