"""Fast matmul paths for uniform group-wise weights: torch's own low-bit ops, laid out from a format.

A fast path takes a uniform weight (kernels/uniform.py: codes [out, in] in original column order,
scales / zeros [out, n_groups], contiguous groups) and lays it out for one torch op. Each path says
why it cannot take a weight (`blockers`), lays the weight out (`layout`: the tensors QuantLinear
keeps as buffers; the layout replaces the codes, it is not a second copy), multiplies
(`matmul`), and gives the codes back exactly (`codes`), so that the layout is the only copy of the
codes a QuantLinear holds.

Our grid is W[n, k] = s * (q - z), q in [0, 2^b - 1], with (s, z) the (scale, zero) of the
group of column k in row n; z is an integer (int zeros), any real (float zeros) or 2^(b-1)
(symmetric grids: zero_format "none", the zeros tensor holds it).

int4_cpu: aten._convert_weight_to_int4pack_for_cpu + aten._weight_int4pack_mm_for_cpu
    Convention (torch's int4mm_kernel.cpp, every variant: the AVX512 lookup table maps a nibble to
    [-8, 7] "dequant = (bf16(int4_value) * bf16_scale) + bf16_zero"; AVX2 and the scalar kernel
    add an offset of -8 the same way; torch's own test quantizes with
    zeros = min + 8 * scale for it): the op multiplies by

        W_op[n, k] = (q - 8) * S[g, n] + Z[g, n],   qScaleAndZeros[g, n] = (S, Z), g = k // G.

    Equating with s * (q - z) = s * (q - 8) + s * (8 - z) for every q gives S = s and
    Z = s * (8 - z) (zero-points move from the code domain to the weight domain). Checked against
    dequantize() in tests/kernels/test_linear.py for int, float and symmetric zeros.
    Constraints (the op's TORCH_CHECKs): codes int32 [N, K], N % 16 == 0, K even; G in
    {32, 64, 128, 256} with K % G == 0; x, scales and output share a dtype (bf16, fp16 or fp32).
    Only bf16 has vectorized kernels on x86 (AVX512 / AVX2): measured on this AVX512 CPU, a
    1 x 576 @ 576 x 576 product takes 18 us in bf16, 27 us as an fp32 nn.Linear, and 430 us
    (fp16) / 370 us (fp32) on the op's scalar fallback. So the path runs in bf16: x, S and Z are
    rounded to bf16, the op accumulates in fp32 and rounds its output to bf16.
    Short last groups. Our group of `group_size` columns may end in a shorter group (576 columns
    at g128: 4 full groups and one of 64). The op's group G only has to tile ours: the largest G
    in {256, 128, 64, 32} that divides both group_size and K lays every op group inside one of
    our groups, and each of our groups' (S, Z) is repeated group_size / G times (576 at g128:
    G = 64, 9 op groups). This is exact, only the (S, Z) table grows. No such G (e.g. g48, or
    K = 200 at g128): the path does not take the weight.
    The packed nibble layout depends on the CPU's capability (AVX512 / AVX2 / scalar): these
    buffers are for this machine; the portable artifact is the format's pack().

int8_cpu: aten._weight_int8pack_mm (symmetric: y = (x @ w8.T) * s, w8 int8, one scale per row)
    Our 8-bit asymmetric codes q in [0, 255] with zero z give
        s * (q - z) = s * ((q - 128) + (128 - z)),
    so with w8 = q - 128 (in [-128, 127], exact in int8)
        y = int8pack_mm(x, w8, s) + x.sum(-1, keepdim=True) * (s * (128 - z)).
    Per channel only: one (s, z) per row (group_size -1, or a single group). The op wants the
    scales in x's dtype; it runs in bf16 (the vectorized kernel, as above: 15 us vs 27 us fp32
    nn.Linear at 576 x 576) and the offset term in fp32 from the unrounded x.
    Measured on torch 2.13 (AVX512): in bf16 with K not a multiple of 16 the op crashes
    (segfault, K = 200, 72, 40, 24) or returns wrong values (K = 100), so the path requires
    K % 16 == 0. The same op exists on CUDA (untested here).

int4_cuda: aten._convert_weight_to_int4pack + aten._weight_int4pack_mm (tinygemm, sm80+)
    UNTESTED HERE: this machine has no GPU; the layout follows torch's CUDA source and its test
    (test_linalg `_int4_mm`), and QuantLinear.consistency_check is the first thing to run on a GPU.
    Same (S, Z) convention and table as int4_cpu ([K / G, N, 2], bf16; Z = s * (8 - z)); codes
    uint8 [N, K / 2] with column 2j in the high nibble and 2j + 1 in the low one, converted on
    the GPU with innerKTiles in {8, 4, 2} (the largest with K % (16 * innerKTiles) == 0); bf16
    activations. Constraints: N % 8 == 0, K % 32 == 0, G as above.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import torch

OP_GROUP_SIZES = (256, 128, 64, 32)  # what the tinygemm ops accept, largest first
_UNPACK_CHUNK = 512  # identity rows per op call when reading codes back


def _op_group_blockers(in_features: int, group_size: int) -> list[str]:
    if op_group_size(in_features, group_size) is not None:
        return []
    return [
        f"no op group size in {'/'.join(map(str, OP_GROUP_SIZES))} divides both group_size "
        f"{group_size} and in_features {in_features}"
    ]


class UnsupportedFormat(ValueError):
    """A fast path was asked to run a weight it cannot take; the message says why."""


def is_uniform(fmt: Any) -> bool:
    """Duck-typed: a uniform group-wise weight (kernels/uniform.py's fields)."""
    return all(
        hasattr(fmt, name)
        for name in ("codes", "scales", "zeros", "g_idx", "bits", "group_size", "zero_format")
    )


def op_group_size(in_features: int, group_size: int) -> int | None:
    """The largest tinygemm group G that tiles our groups: G divides group_size (one group per
    row: the whole row) and in_features, so every op group lies inside one of our groups."""
    span = in_features if group_size == -1 or group_size >= in_features else group_size
    for size in OP_GROUP_SIZES:
        if span % size == 0 and in_features % size == 0:
            return size
    return None


def _n_outliers(fmt: Any) -> int:
    idx = getattr(fmt, "outlier_idx", None)
    return 0 if idx is None else int(idx.numel())


def _widths(fmt: Any) -> list[int]:
    group_bits = getattr(fmt, "group_bits", None)
    return [fmt.bits] if group_bits is None else sorted({int(w) for w in group_bits.tolist()})


def _groups_contiguous(fmt: Any) -> bool:
    in_features = fmt.codes.shape[1]
    if fmt.group_size == -1:
        expected = torch.zeros(in_features, dtype=torch.int64)
    else:
        expected = torch.arange(in_features) // fmt.group_size
    return torch.equal(fmt.g_idx.long().cpu(), expected)


def uniform_blockers(fmt: Any, bits: int) -> list[str]:
    """Reasons shared by every path: the grid itself (a uniform, fixed-width, contiguous grid)."""
    if not is_uniform(fmt):
        return [
            f"{type(fmt).__name__} is not a uniform group-wise weight (only the reference path dequantizes it)"
        ]
    reasons = []
    widths = _widths(fmt)
    if len(widths) > 1:
        reasons.append(f"mixed per-group widths ({'/'.join(map(str, widths))} bits, group_bits)")
    elif widths[0] != bits or fmt.bits != bits:
        reasons.append(f"needs {bits}-bit codes, this weight has {widths[0]}-bit codes")
    if getattr(fmt, "binary_one_bit", False) and 1 in widths:
        reasons.append("sign-binarized 1-bit groups (SliM-LLM: zero + scale * (2 * code - 1))")
    if _n_outliers(fmt):
        reasons.append(f"{_n_outliers(fmt)} fp16 outlier columns (OWQ; their groups skip those columns)")
    elif not _groups_contiguous(fmt):
        reasons.append("groups are not contiguous runs of group_size columns (act-order g_idx)")
    return reasons


def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device if device is not None else "cpu").type


def cpu_is_vectorized() -> bool:
    """Whether torch has vectorized kernels for the bf16 low-bit ops on this CPU (x86 AVX2 /
    AVX512, or ARM). Elsewhere they fall back to scalar loops slower than a dense matmul, so
    `auto` does not pick them (an explicit request still runs them)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@dataclass(frozen=True)
class FastPath:
    """One torch op family: see the module docstring for each convention."""

    name: str
    device_type: str  # where its layout runs

    def available(self) -> str | None:
        """Why this torch build cannot run the path at all (None: it can)."""
        raise NotImplementedError

    def blockers(self, fmt: Any, device: torch.device | str | None = None) -> list[str]:
        """Every reason the path cannot take `fmt` on `device` (empty: it can)."""
        raise NotImplementedError

    def layout(self, fmt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(buffers, static config) for the op, on fmt's device; fmt must pass `blockers`."""
        raise NotImplementedError

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] in x's dtype."""
        raise NotImplementedError

    def codes(self, buffers: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        """The codes [N, K] uint8 in original column order, exactly."""
        raise NotImplementedError


def _scales_and_zeros(fmt: Any, group: int) -> torch.Tensor:
    """tinygemm's [K / G, N, 2] table: (S, Z) = (s, s * (8 - z)) of our group around each op group."""
    out_features, in_features = fmt.codes.shape
    starts = torch.arange(0, in_features, group, device=fmt.scales.device)
    per_row = fmt.group_size == -1 or fmt.group_size >= in_features
    ours = torch.zeros_like(starts) if per_row else starts // fmt.group_size
    scales = fmt.scales.float()[:, ours]
    zeros = fmt.zeros.float()[:, ours]
    table = torch.stack([scales, scales * (8.0 - zeros)], dim=-1)  # [N, K / G, 2]
    return table.transpose(0, 1).contiguous().to(torch.bfloat16)


def _unit_table(n_groups: int, out_features: int, device: torch.device) -> torch.Tensor:
    """(S, Z) = (1, 8): the op then returns the codes themselves."""
    table = torch.empty(n_groups, out_features, 2, dtype=torch.bfloat16, device=device)
    table[..., 0] = 1.0
    table[..., 1] = 8.0
    return table


def _codes_through_op(
    mm, packed: torch.Tensor, group: int, in_features: int, out_features: int
) -> torch.Tensor:
    """Read the codes back through the op itself: rows of the identity times W_op with unit
    scales give q exactly (small integers; one nonzero product per output, fp32 accumulation),
    whatever nibble order the layout uses on this machine."""
    device = packed.device
    unit = _unit_table(in_features // group, out_features, device)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
    for start in range(0, in_features, _UNPACK_CHUNK):
        rows = min(_UNPACK_CHUNK, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=torch.bfloat16, device=device)
        eye[torch.arange(rows, device=device), start + torch.arange(rows, device=device)] = 1.0
        codes[:, start : start + rows] = mm(eye, packed, group, unit).float().round().T.to(torch.uint8)
    return codes


class Int4CPU(FastPath):
    def available(self) -> str | None:
        for op in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"):
            if not hasattr(torch.ops.aten, op):
                return f"this torch ({torch.__version__}) has no aten.{op}"
        return None

    def blockers(self, fmt: Any, device: torch.device | str | None = None) -> list[str]:
        reasons = [r for r in [self.available()] if r]
        if _device_type(device) != "cpu":
            reasons.append(f"the weight is to run on {_device_type(device)}; int4_cpu runs on the CPU")
        reasons += uniform_blockers(fmt, 4)
        if not is_uniform(fmt):
            return reasons
        out_features, in_features = fmt.codes.shape
        if out_features % 16:
            reasons.append(f"out_features {out_features} is not a multiple of 16 (the op's packing)")
        reasons += _op_group_blockers(in_features, fmt.group_size)
        return reasons

    def layout(self, fmt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        out_features, in_features = fmt.codes.shape
        group = op_group_size(in_features, fmt.group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(fmt.codes.to(torch.int32).contiguous(), 2)
        buffers = {"int4_packed": packed, "int4_scales_and_zeros": _scales_and_zeros(fmt, group)}
        return buffers, {"op_group_size": group}

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(),
            buffers["int4_packed"],
            config["op_group_size"],
            buffers["int4_scales_and_zeros"],
        )
        return y.to(x.dtype)

    def codes(self, buffers: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        packed = buffers["int4_packed"]
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        return _codes_through_op(
            torch.ops.aten._weight_int4pack_mm_for_cpu,
            packed,
            config["op_group_size"],
            in_features,
            out_features,
        )


class Int4CUDA(FastPath):
    """UNTESTED HERE (no GPU on the development machine); see the module docstring."""

    def available(self) -> str | None:
        for op in ("_convert_weight_to_int4pack", "_weight_int4pack_mm"):
            if not hasattr(torch.ops.aten, op):
                return f"this torch ({torch.__version__}) has no aten.{op}"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def blockers(self, fmt: Any, device: torch.device | str | None = None) -> list[str]:
        reasons = [r for r in [self.available()] if r]
        if _device_type(device) != "cuda":
            reasons.append(f"the weight is to run on {_device_type(device)}; int4_cuda runs on a CUDA GPU")
        elif not reasons and torch.cuda.get_device_capability(torch.device(device)) < (8, 0):
            reasons.append("tinygemm needs a GPU of compute capability 8.0 or newer")
        reasons += uniform_blockers(fmt, 4)
        if not is_uniform(fmt):
            return reasons
        out_features, in_features = fmt.codes.shape
        if out_features % 8:
            reasons.append(f"out_features {out_features} is not a multiple of 8 (the op's n-tiles)")
        if in_features % 32:
            reasons.append(f"in_features {in_features} is not a multiple of 32 (2 k-tiles of 16)")
        reasons += _op_group_blockers(in_features, fmt.group_size)
        return reasons

    def layout(self, fmt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        out_features, in_features = fmt.codes.shape
        group = op_group_size(in_features, fmt.group_size)
        inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
        codes = fmt.codes.to(torch.uint8)
        nibbles = ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()  # column 2j high, 2j + 1 low
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
        buffers = {"int4_packed": packed, "int4_scales_and_zeros": _scales_and_zeros(fmt, group)}
        return buffers, {"op_group_size": group, "in_features": in_features, "out_features": out_features}

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm(
            x.to(torch.bfloat16).contiguous(),
            buffers["int4_packed"],
            config["op_group_size"],
            buffers["int4_scales_and_zeros"],
        )
        return y.to(x.dtype)

    def codes(self, buffers: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        return _codes_through_op(
            torch.ops.aten._weight_int4pack_mm,
            buffers["int4_packed"],
            config["op_group_size"],
            config["in_features"],
            config["out_features"],
        )


class Int8(FastPath):
    def available(self) -> str | None:
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return f"this torch ({torch.__version__}) has no aten._weight_int8pack_mm"
        return None

    def blockers(self, fmt: Any, device: torch.device | str | None = None) -> list[str]:
        reasons = [r for r in [self.available()] if r]
        reasons += uniform_blockers(fmt, 8)
        if not is_uniform(fmt):
            return reasons
        in_features = fmt.codes.shape[1]
        n_groups = fmt.scales.shape[1]
        if n_groups != 1:
            reasons.append(
                f"{n_groups} groups per row (group_size {fmt.group_size}): the int8 op has one scale per "
                "output channel (group_size -1)"
            )
        if in_features % 16:
            reasons.append(
                f"in_features {in_features} is not a multiple of 16: torch {torch.__version__}'s bf16 int8 "
                "kernel crashes or returns wrong values there (measured)"
            )
        return reasons

    def layout(self, fmt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        scales = fmt.scales.float()[:, 0]
        zeros = fmt.zeros.float()[:, 0]
        buffers = {
            "int8_weight": (fmt.codes.to(torch.int16) - 128).to(torch.int8).contiguous(),
            "int8_scales": scales.to(torch.bfloat16),
            "int8_offset": (scales * (128.0 - zeros)).contiguous(),  # fp32: s * (128 - z) per row
        }
        return buffers, {}

    def matmul(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16).contiguous(), buffers["int8_weight"], buffers["int8_scales"]
        )
        y = y.float() + x.float().sum(dim=-1, keepdim=True) * buffers["int8_offset"]
        return y.to(x.dtype)

    def codes(self, buffers: dict[str, torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
        return (buffers["int8_weight"].to(torch.int16) + 128).to(torch.uint8)


FAST_PATHS: dict[str, FastPath] = {
    "int4_cpu": Int4CPU("int4_cpu", "cpu"),
    "int8_cpu": Int8("int8_cpu", "any"),
    "int4_cuda": Int4CUDA("int4_cuda", "cuda"),
}


def choose_fast_path(fmt: Any, device: torch.device | str | None) -> tuple[str | None, dict[str, list[str]]]:
    """`auto`: the first path that takes `fmt` on `device` (int4 before int8, the device's own
    int4 op), and every path's reasons for not taking it."""
    kind = _device_type(device)
    order = ("int4_cuda", "int8_cpu") if kind == "cuda" else ("int4_cpu", "int8_cpu")
    reasons: dict[str, list[str]] = {}
    for name in order:
        blockers = FAST_PATHS[name].blockers(fmt, device)
        if kind == "cpu" and not blockers and not cpu_is_vectorized():
            blockers = [
                f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no vectorized kernel for it"
            ]
        if not blockers:
            return name, reasons
        reasons[name] = blockers
    return None, reasons
