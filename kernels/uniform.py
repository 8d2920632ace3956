"""Uniform group-wise weights: the format of RTN, GPTQ, AWQ, OWQ and SliM-LLM.

A `UniformWeight` holds integer codes on a uniform grid, one (scale, zero) pair per (row, group),
the group of every input column (`g_idx`), optionally a bit width per group (`group_bits`,
SliM-LLM's mixed precision) and optional full-precision outlier columns (OWQ). It rebuilds the
fake-quant weight used for evaluation, W[r, c] = scale[r, g] * (code[r, c] - zero[r, g]) with
g = g_idx[c], and counts its exact storage bits, so that bits-per-weight is counted the same way
for every method (reference/methods.md §8), never taken from a nominal number.

Per tensor (`per_tensor=True`): one (scale, zero) for the whole matrix. In memory nothing changes
(group_size -1, scales / zeros [out, 1], every row holding the same pair, which __post_init__
checks), so dequantize and the fast paths run it as a per-channel weight; storage holds that pair
once: `storage_bits` counts scale_bits + zero bits one time, not per row, and pack() stores
"scales" / "zeros" as a single row [1, ...] that unpack() repeats.

Widths. `bits` is the nominal width (what records report). With `group_bits` [n_groups] each
group g has its own width w_g (codes of group g in [0, 2^w_g - 1]); without it every group has
`bits`.

Sign-binarized 1-bit groups (`binary_one_bit`, SliM-LLM, reference/methods.md §6.3): with
`group_bits` and int zeros, a group of width 1 holds q = sign(w - z) * delta + z per row, which the
affine rule scale * (code - zero) cannot give bit for bit. Such a group stores delta in `scales`
and the row mean z in `zeros` (a float, fp16 in storage) and dequantizes as
W[r, c] = zero[r, g] + scale[r, g] * (2 * code[r, c] - 1), codes in {0, 1}; z + (+-delta) is
exactly the reference's (+-delta) + z. Every other group keeps the affine rule and its int zero.

Storage convention (what `storage_bits` counts):
- codes: w_g bits per quantized weight of group g (outlier columns carry no codes);
- scales: `scale_bits` (16: fp16) per (row, group);
- zeros: w_g bits per (row, group) for integer zero-points (packed, as AutoGPTQ / AutoAWQ GEMM
  do), 16 for floating zero-points (tinygemm, GGUF Q4_1), nothing for symmetric grids (implicit
  zero 2^(w_g - 1), the zero every symmetric grid in kernels/grid.py uses); 16 (fp16) for
  the float mean of a sign-binarized 1-bit group;
- group widths: with `group_bits`, 8 bits per group (the uint8 width table; a layer-constant
  cost, 8 / (out * group_size) bits per weight). Without it, nothing (`bits` is in the meta);
- g_idx: 32 bits per input column, only when the groups are not contiguous runs of `group_size`
  columns (act-order with dynamic groups): a contiguous layout is implied by `group_size` alone
  (with outlier columns: runs of the remaining columns, which is how OWQ groups them);
- outliers: 16 bits per value (fp16, C_out values per column) plus a 32-bit index per outlier
  column, instead of w_g bits per value. OWQ's packed format (reference/methods.md §5.3) also
  keeps codes for those columns and 4-bit zeros at 3 bits; the papers' "3.01" counts only the
  (16 - b) extra bits per outlier value (§8). This count sits between the two and is the same
  for every method.

Packed layout (`pack()`; bitstreams are kernels/packing.py's LSB-first rows of int32 words):
- "codes" [out, ceil(n_q * bits / 32)]: per row, the codes of the n_q quantized (non-outlier)
  columns in column order. With `group_bits`: "codes.{w}bit" per width w present, per row the
  codes of the quantized columns whose group has width w, in column order;
- "zeros": int zero-points as a bitstream per row ([out, ceil(n_groups * bits / 32)]; with
  `group_bits` "zeros.{w}bit", the groups of width w in group order); float zero-points as fp16
  [out, n_groups]; nothing for symmetric grids; sign-binarized 1-bit groups: "zeros.1bit" fp16
  [out, n_1bit_groups] instead of a bitstream;
- "scales" [out, n_groups] fp16 (fp32 when scale_bits == 32);
- "g_idx" [in] int32, only when the groups are not contiguous;
- "outlier_idx" [k] int32 and "outlier_values" [out, k] fp16;
- "group_bits" [n_groups] uint8, only with per-group widths.
padding_bits() = the zero bits that round each row's code and int-zero bitstreams up to whole
32-bit words; everything else is stored at exactly its counted width.

As stored (`rounded_to_storage()`, and what `unpack` returns): scales fp16 (fp32 at
scale_bits 32), float zeros fp16, int / implicit zeros float32 (integer-valued), outlier values
fp16, g_idx / outlier_idx / group_bits int32, codes uint8 (int32 when a width exceeds 8). Outlier
columns store no codes: their codes come back as the zero-point of their group in that row
(int and symmetric grids; what GPTQ's export writes there) or 0 (float zeros), and with
contiguous groups their g_idx entries come back as 0. Neither reaches `dequantize`, which puts the
fp16 values in those columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from quantlab.kernels.format import WeightFormat, fresh
from quantlab.kernels.groups import contiguous_g_idx, contiguous_g_idx_skipping
from quantlab.kernels.packing import pack_codes, packed_words, unpack_codes

ZeroFormat = Literal["int", "float", "none"]
GIdxLayout = Literal["contiguous", "contiguous_skipping_outliers", "explicit"]
_SCALE_DTYPES = {16: torch.float16, 32: torch.float32}


def implicit_zeros(widths: torch.Tensor, out_features: int) -> torch.Tensor:
    """The zero-points of symmetric grids: 2^(w_g - 1) for every (row, group), [out, n_groups] fp32."""
    zero = torch.pow(2.0, (widths.to(torch.int64) - 1).float())
    return zero.expand(out_features, -1).contiguous()


@dataclass
class _WidthClass:
    """Columns and groups that share one bit width (one class in the packed layout)."""

    width: int
    columns: torch.Tensor  # quantized columns whose group has this width, ascending
    groups: torch.Tensor  # groups of this width, ascending


@dataclass
class UniformWeight(WeightFormat):
    format_name: ClassVar[str] = "uniform"

    codes: torch.Tensor  # [out, in] integer levels, original column order
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor  # [out, n_groups]; integer-valued unless zero_format == "float"
    g_idx: torch.Tensor  # [in] int32, group of each input column
    bits: int  # nominal width; every group's width when group_bits is None
    group_size: int  # -1: one group per row
    zero_format: ZeroFormat = "int"
    scale_bits: int = 16
    # OWQ-style full-precision columns: indices [k] and values [out, k]; their codes are ignored.
    outlier_idx: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # free-form, JSON-serializable; travels in meta()
    group_bits: torch.Tensor | None = None  # [n_groups] int: each group's own width (SliM-LLM)
    binary_one_bit: bool = False  # 1-bit groups are sign-binarized around a float zero (module docstring)
    per_tensor: bool = False  # one (scale, zero) for the whole matrix, stored once (module docstring)

    def __post_init__(self) -> None:
        out_features, in_features = self.codes.shape
        if self.g_idx.shape != (in_features,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({in_features},)")
        n_groups = int(self.g_idx.max()) + 1 if in_features else 0
        if self.scales.shape != (out_features, n_groups) or self.zeros.shape != (out_features, n_groups):
            raise ValueError(
                f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match "
                f"({out_features}, {n_groups}) groups implied by g_idx"
            )
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {self.bits}")
        if self.zero_format not in ("int", "float", "none"):
            raise ValueError(f"zero_format must be int, float or none, got {self.zero_format!r}")
        if (self.outlier_idx is None) != (self.outlier_values is None):
            raise ValueError("outlier_idx and outlier_values come together")
        if self.outlier_idx is not None and self.outlier_values.shape != (out_features, self.outlier_idx.numel()):
            raise ValueError(
                f"outlier_values has shape {tuple(self.outlier_values.shape)}, expected "
                f"({out_features}, {self.outlier_idx.numel()})"
            )
        if self.group_bits is not None:
            if self.group_bits.shape != (n_groups,):
                raise ValueError(f"group_bits has shape {tuple(self.group_bits.shape)}, expected ({n_groups},)")
            if n_groups and not 1 <= int(self.group_bits.min()) <= int(self.group_bits.max()) <= 16:
                raise ValueError("group widths must be in 1..16")
        if self.binary_one_bit and (self.group_bits is None or self.zero_format != "int"):
            raise ValueError("binary_one_bit needs group_bits and int zeros (the other groups' zero-points)")
        if self.per_tensor:
            if self.group_size != -1 or n_groups > 1 or self.group_bits is not None:
                raise ValueError("per_tensor is one group per row (group_size -1) without group_bits")
            if not (bool((self.scales == self.scales[:1]).all()) and bool((self.zeros == self.zeros[:1]).all())):
                raise ValueError("per_tensor: every row must hold the same (scale, zero)")

    # ---- layout -------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def _param_rows(self) -> int:
        """Rows of (scale, zero) in storage: 1 per tensor, else one per output row."""
        return 1 if self.per_tensor else self.shape[0]

    def _stored_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[:1] if self.per_tensor else t

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    @property
    def g_idx_layout(self) -> GIdxLayout:
        """How g_idx is stored: implied by group_size over all columns ("contiguous"), implied by
        group_size over the non-outlier columns in order (OWQ, "contiguous_skipping_outliers"; the
        outliers carry no codes, so their own g_idx entries are ignored), or stored ("explicit")."""
        g_idx = self.g_idx.to(torch.int32)
        if torch.equal(g_idx, contiguous_g_idx(g_idx.numel(), self.group_size, device=g_idx.device)):
            return "contiguous"
        if not self.n_outliers:
            return "explicit"
        quantized = self._quantized_mask()
        kept = g_idx[quantized]
        if torch.equal(kept, contiguous_g_idx(kept.numel(), self.group_size, device=kept.device)):
            return "contiguous_skipping_outliers"
        return "explicit"

    @property
    def groups_contiguous(self) -> bool:
        """Whether g_idx is implied by `group_size` (see g_idx_layout) and costs no storage."""
        return self.g_idx_layout != "explicit"

    def group_widths(self) -> torch.Tensor:
        """[n_groups] int64: each group's width (`bits` everywhere without group_bits)."""
        if self.group_bits is None:
            return torch.full((self.n_groups,), self.bits, dtype=torch.int64, device=self.g_idx.device)
        return self.group_bits.to(torch.int64)

    def _quantized_mask(self) -> torch.Tensor:
        mask = torch.ones(self.shape[1], dtype=torch.bool, device=self.g_idx.device)
        if self.outlier_idx is not None:
            mask[self.outlier_idx.long().to(mask.device)] = False
        return mask

    @staticmethod
    def _width_classes(
        g_idx: torch.Tensor, quantized: torch.Tensor, widths: torch.Tensor | None, bits: int, n_groups: int
    ) -> list[_WidthClass]:
        """One class per width in use: `bits` alone without per-group widths."""
        columns = torch.nonzero(quantized).flatten()
        if widths is None:
            groups = torch.arange(n_groups, device=g_idx.device)
            return [_WidthClass(bits, columns, groups)]
        column_widths = widths[g_idx.long()[columns]]
        return [
            _WidthClass(w, columns[column_widths == w], torch.nonzero(widths == w).flatten())
            for w in sorted({int(v) for v in widths.tolist()})
        ]

    def _classes(self) -> list[_WidthClass]:
        widths = None if self.group_bits is None else self.group_widths()
        return self._width_classes(self.g_idx, self._quantized_mask(), widths, self.bits, self.n_groups)

    def binary_groups(self) -> torch.Tensor:
        """[n_groups] bool: the sign-binarized groups (width 1 with binary_one_bit)."""
        if not self.binary_one_bit:
            return torch.zeros(self.n_groups, dtype=torch.bool, device=self.g_idx.device)
        return self.group_widths() == 1

    def _implicit_zeros(self, widths: torch.Tensor) -> torch.Tensor:
        return implicit_zeros(widths, self.shape[0]).to(self.scales.device)

    # ---- values -------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fake-quant weight: scale * (code - zero) per (row, group of the column)."""
        idx = self.g_idx.long()
        scales = self.scales.float()[:, idx]
        zeros = self.zeros.float()[:, idx]
        weight = scales * (self.codes.float() - zeros)
        binary = self.binary_groups()
        if bool(binary.any()):
            columns = binary.to(idx.device)[idx]
            signs = 2 * self.codes[:, columns].float() - 1
            weight[:, columns] = zeros[:, columns] + scales[:, columns] * signs
        if self.outlier_idx is not None and self.outlier_values is not None:
            weight[:, self.outlier_idx.long()] = self.outlier_values.float()
        return weight.to(dtype)

    def storage_bits(self) -> int:
        """Exact number of bits this weight needs in storage (see the module docstring)."""
        out_features, in_features = self.shape
        n_outliers = self.n_outliers
        n_groups = self.n_groups
        if self.group_bits is None:
            zero_bits = {"int": self.bits, "float": 16, "none": 0}[self.zero_format]
            total = out_features * (in_features - n_outliers) * self.bits
            total += self._param_rows * n_groups * (self.scale_bits + zero_bits)
        else:
            widths = self.group_widths()
            column_widths = widths[self.g_idx.long()][self._quantized_mask()]
            total = out_features * int(column_widths.sum())
            total += out_features * n_groups * self.scale_bits
            binary = self.binary_groups()
            int_zero_bits = int(widths[~binary].sum()) + 16 * int(binary.sum())  # fp16 means of binary groups
            total += out_features * {"int": int_zero_bits, "float": 16 * n_groups, "none": 0}[self.zero_format]
            total += 8 * n_groups
        if not self.groups_contiguous:
            total += 32 * in_features
        total += n_outliers * (16 * out_features + 32)
        return total

    def padding_bits(self) -> int:
        """Bits that round the per-row code (and int-zero) bitstreams up to whole 32-bit words."""
        out_features = self.shape[0]
        total = 0
        for cls in self._classes():
            n_cols, n_zeros = cls.columns.numel(), cls.groups.numel()
            total += out_features * (packed_words(n_cols, cls.width) * 32 - n_cols * cls.width)
            if self.zero_format == "int" and not self._binary_class(cls.width):
                total += self._param_rows * (packed_words(n_zeros, cls.width) * 32 - n_zeros * cls.width)
        return total

    # ---- storage ------------------------------------------------------------------------------

    def _check_storable(self) -> None:
        self.validate()
        if self.scale_bits not in _SCALE_DTYPES:
            raise ValueError(f"pack stores scales as fp16 or fp32: scale_bits must be 16 or 32, got {self.scale_bits}")
        stored = self.scales.to(_SCALE_DTYPES[self.scale_bits])
        if not bool(torch.isfinite(stored).all()):
            raise ValueError(f"scales are not finite in {stored.dtype}")
        if self.zero_format == "int":
            binary = self.binary_groups().to(self.zeros.device)
            if not bool(torch.isfinite(self.zeros[:, binary].to(torch.float16)).all()):
                raise ValueError("the float zeros of sign-binarized 1-bit groups are not finite in fp16")
            zeros = torch.where(binary, 0.0, self.zeros.float())  # the binary groups' means: any float
            if not bool((zeros == zeros.round()).all()):
                raise ValueError("integer zero-points must be integer-valued")
            if self.n_groups:
                maxq = torch.pow(2.0, self.group_widths().float()) - 1
                if bool((zeros < 0).any()) or bool((zeros > maxq.to(zeros.device)).any()):
                    raise ValueError("integer zero-points must lie in [0, 2^width - 1] of their group")
        elif self.zero_format == "none":
            if not torch.equal(self.zeros.float(), self._implicit_zeros(self.group_widths()).to(self.zeros.device)):
                raise ValueError("a symmetric grid (zero_format 'none') stores no zeros: they must be 2^(width - 1)")
        elif not bool(torch.isfinite(self.zeros.to(torch.float16)).all()):
            raise ValueError("float zero-points are not finite in fp16")

    def _code_dtype(self, max_width: int) -> torch.dtype:
        return torch.uint8 if max_width <= 8 else torch.int32

    def _fill_outlier_codes(self, codes: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> None:
        if not self.n_outliers:
            return
        cols = self.outlier_idx.long().to(codes.device)
        if self.zero_format == "float":
            codes[:, cols] = 0
        else:
            codes[:, cols] = zeros.float()[:, g_idx.long()[cols]].to(codes.dtype)

    def rounded_to_storage(self) -> UniformWeight:
        """This weight as `pack()` stores it and `unpack` returns it (see the module docstring):
        fp16 scales and float zeros, fp16 outlier values, outlier codes and g_idx entries filled."""
        self._check_storable()
        widths = self.group_widths()
        layout = self.g_idx_layout
        g_idx = self.g_idx.to(torch.int32).clone()
        if layout == "contiguous_skipping_outliers":
            g_idx = contiguous_g_idx_skipping(g_idx.numel(), self.group_size, self.outlier_idx).to(g_idx.device)
        if self.zero_format == "float":
            zeros = self.zeros.to(torch.float16).clone()
        elif self.zero_format == "none":
            zeros = self._implicit_zeros(widths)
        else:
            zeros = self.zeros.float().clone()
            binary = self.binary_groups().to(zeros.device)
            zeros[:, binary] = zeros[:, binary].to(torch.float16).float()
        codes = self.codes.to(self._code_dtype(int(widths.max()) if widths.numel() else self.bits)).clone()
        self._fill_outlier_codes(codes, zeros, g_idx)
        return UniformWeight(
            codes=codes,
            scales=self.scales.to(_SCALE_DTYPES[self.scale_bits]).clone(),
            zeros=zeros,
            g_idx=g_idx,
            bits=self.bits,
            group_size=self.group_size,
            zero_format=self.zero_format,
            scale_bits=self.scale_bits,
            outlier_idx=None if self.outlier_idx is None else self.outlier_idx.to(torch.int32).clone(),
            outlier_values=None if self.outlier_values is None else self.outlier_values.to(torch.float16).clone(),
            info=dict(self.info),
            group_bits=None if self.group_bits is None else self.group_bits.to(torch.int32).clone(),
            binary_one_bit=self.binary_one_bit,
            per_tensor=self.per_tensor,
        )

    def _binary_class(self, width: int) -> bool:
        return self.binary_one_bit and width == 1

    def _class_name(self, kind: str, width: int) -> str:
        return kind if self.group_bits is None else f"{kind}.{width}bit"

    def pack(self) -> dict[str, torch.Tensor]:
        """Named tensors of the packed layout (module docstring), on the weight's device."""
        self._check_storable()
        tensors: dict[str, torch.Tensor] = {}
        for cls in self._classes():
            tensors[self._class_name("codes", cls.width)] = pack_codes(self.codes[:, cls.columns.to(self.codes.device)], cls.width)
            if self._binary_class(cls.width):
                tensors[self._class_name("zeros", cls.width)] = fresh(self.zeros[:, cls.groups.to(self.zeros.device)], torch.float16)
            elif self.zero_format == "int":
                zeros = self._stored_rows(self.zeros)[:, cls.groups.to(self.zeros.device)].round().to(torch.int64)
                tensors[self._class_name("zeros", cls.width)] = pack_codes(zeros, cls.width)
        if self.zero_format == "float":
            tensors["zeros"] = fresh(self._stored_rows(self.zeros), torch.float16)
        tensors["scales"] = fresh(self._stored_rows(self.scales), _SCALE_DTYPES[self.scale_bits])
        if self.g_idx_layout == "explicit":
            tensors["g_idx"] = fresh(self.g_idx, torch.int32)
        if self.outlier_idx is not None:
            tensors["outlier_idx"] = fresh(self.outlier_idx, torch.int32)
            tensors["outlier_values"] = fresh(self.outlier_values, torch.float16)
        if self.group_bits is not None:
            tensors["group_bits"] = fresh(self.group_bits, torch.uint8)
        return tensors

    def meta(self) -> dict[str, Any]:
        return {
            "format_name": self.format_name,
            "version": 1,
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_format": self.zero_format,
            "scale_bits": self.scale_bits,
            "n_groups": self.n_groups,
            "g_idx_layout": self.g_idx_layout,
            "n_outliers": self.n_outliers,
            "mixed_widths": self.group_bits is not None,
            "binary_one_bit": self.binary_one_bit,
            "per_tensor": self.per_tensor,
            "info": dict(self.info),
        }

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> UniformWeight:
        cls.check_meta(meta)
        out_features, in_features = meta["shape"]
        bits, group_size, n_groups = meta["bits"], meta["group_size"], meta["n_groups"]
        zero_format, scale_bits = meta["zero_format"], meta["scale_bits"]
        per_tensor = meta.get("per_tensor", False)
        scales = tensors["scales"]
        if per_tensor:  # stored once: every row holds it
            scales = scales.repeat(out_features, 1)
        device = scales.device
        outlier_idx = tensors.get("outlier_idx") if meta["n_outliers"] else None
        outlier_values = tensors.get("outlier_values") if meta["n_outliers"] else None
        layout = meta["g_idx_layout"]
        if layout == "explicit":
            g_idx = tensors["g_idx"]
        elif layout == "contiguous_skipping_outliers":
            g_idx = contiguous_g_idx_skipping(in_features, group_size, outlier_idx).to(device)
        else:
            g_idx = contiguous_g_idx(in_features, group_size, device=device)
        group_bits = tensors["group_bits"].to(torch.int32) if meta["mixed_widths"] else None
        widths = (
            torch.full((n_groups,), bits, dtype=torch.int64, device=device)
            if group_bits is None
            else group_bits.to(torch.int64)
        )
        quantized = torch.ones(in_features, dtype=torch.bool, device=device)
        if outlier_idx is not None:
            quantized[outlier_idx.long()] = False
        classes = cls._width_classes(g_idx, quantized, None if group_bits is None else widths, bits, n_groups)
        max_width = int(widths.max()) if widths.numel() else bits
        codes = torch.zeros(
            out_features, in_features, dtype=torch.uint8 if max_width <= 8 else torch.int32, device=device
        )
        if zero_format == "float":
            zeros = tensors["zeros"].repeat(out_features, 1) if per_tensor else tensors["zeros"]
        elif zero_format == "none":
            zeros = implicit_zeros(widths, out_features)
        else:
            zeros = torch.zeros(out_features, n_groups, dtype=torch.float32, device=device)
        for width_class in classes:
            suffix = "" if group_bits is None else f".{width_class.width}bit"
            width, columns, groups = width_class.width, width_class.columns, width_class.groups
            codes[:, columns] = unpack_codes(tensors["codes" + suffix], width, columns.numel()).to(codes.dtype)
            if width == 1 and meta.get("binary_one_bit", False):
                zeros[:, groups] = tensors["zeros" + suffix].float()
            elif zero_format == "int":
                zeros[:, groups] = unpack_codes(tensors["zeros" + suffix], width, groups.numel()).float()
        weight = cls(
            codes=codes,
            scales=scales,
            zeros=zeros,
            g_idx=g_idx.to(torch.int32),
            bits=bits,
            group_size=group_size,
            zero_format=zero_format,
            scale_bits=scale_bits,
            outlier_idx=outlier_idx,
            outlier_values=outlier_values,
            info=dict(meta.get("info", {})),
            group_bits=group_bits,
            binary_one_bit=meta.get("binary_one_bit", False),
            per_tensor=per_tensor,
        )
        weight._fill_outlier_codes(weight.codes, weight.zeros, weight.g_idx)
        return weight

    def validate(self) -> None:
        """Check that codes are integers and each lies in its group's range [0, 2^w_g - 1]."""
        if self.codes.dtype == torch.bool or self.codes.is_floating_point():
            raise TypeError(f"codes must have an integer dtype, got {self.codes.dtype}")
        if not self.shape[1]:
            return
        quantized = self._quantized_mask()
        maxq = (2 ** self.group_widths() - 1)[self.g_idx.long()[quantized]]
        codes = self.codes.long()[:, quantized.to(self.codes.device)]
        if bool((codes < 0).any()) or bool((codes > maxq.to(codes.device)).any()):
            raise ValueError("codes must lie in [0, 2^width - 1] of their group")


QuantizedWeight = UniformWeight  # the name methods and records have used so far
