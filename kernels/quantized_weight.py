"""The one object every quantized linear turns into, whatever the method.

A `QuantizedWeight` holds integer codes on a uniform grid, one (scale, zero) pair per (row, group),
the group of every input column (`g_idx`), and optional full-precision outlier columns (OWQ).
It rebuilds the fake-quant weight used for evaluation and counts its exact storage bits, so that
bits-per-weight is counted the same way for every method (reference/methods.md §8), never taken
from a nominal number.

Storage convention (what `storage_bits` counts):
- codes: `bits` per quantized weight (outlier columns carry no codes);
- scales: `scale_bits` (16: fp16) per (row, group);
- zeros: `bits` per (row, group) for integer zero-points (packed, as AutoGPTQ / AutoAWQ GEMM do),
  16 for floating zero-points (tinygemm, GGUF Q4_1), nothing for symmetric grids (implicit zero);
- g_idx: 32 bits per input column, only when the groups are not contiguous runs of `group_size`
  columns (act-order with dynamic groups): a contiguous layout is implied by `group_size` alone
  (with outlier columns: runs of the remaining columns, which is how OWQ groups them);
- outliers: 16 bits per value (fp16, C_out values per column) plus a 32-bit index per outlier column,
  instead of `bits` per value. OWQ's packed format (reference/methods.md §5.3) also keeps codes for
  those columns and 4-bit zeros at 3 bits; the papers' "3.01" counts only the (16 - b) extra bits
  per outlier value (§8). This count sits between the two and is the same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ZeroFormat = Literal["int", "float", "none"]


def contiguous_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Group index of each input column when groups are consecutive runs (the last may be short)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return torch.arange(in_features, dtype=torch.int32) // group_size


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [out, in] integer levels in [0, 2^bits - 1], original column order
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor  # [out, n_groups]; integer-valued unless zero_format == "float"
    g_idx: torch.Tensor  # [in] int32, group of each input column
    bits: int
    group_size: int  # -1: one group per row
    zero_format: ZeroFormat = "int"
    scale_bits: int = 16
    # OWQ-style full-precision columns: indices [k] and values [out, k]; their codes are ignored.
    outlier_idx: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

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

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def groups_contiguous(self) -> bool:
        """Whether g_idx is implied by `group_size`: consecutive runs of all columns, or, with
        outlier columns, consecutive runs of the other columns in their original order (OWQ's
        groups; the outliers carry no codes, so their own g_idx entries are ignored)."""
        g_idx = self.g_idx.to(torch.int32)
        if torch.equal(g_idx, contiguous_g_idx(g_idx.numel(), self.group_size).to(g_idx.device)):
            return True
        if self.outlier_idx is None or not self.outlier_idx.numel():
            return False
        quantized = torch.ones_like(g_idx, dtype=torch.bool)
        quantized[self.outlier_idx.long()] = False
        g_idx = g_idx[quantized]
        return torch.equal(g_idx, contiguous_g_idx(g_idx.numel(), self.group_size).to(g_idx.device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fake-quant weight: scale * (code - zero) per (row, group of the column)."""
        idx = self.g_idx.long()
        scales = self.scales.float()[:, idx]
        zeros = self.zeros.float()[:, idx]
        weight = scales * (self.codes.float() - zeros)
        if self.outlier_idx is not None and self.outlier_values is not None:
            weight[:, self.outlier_idx.long()] = self.outlier_values.float()
        return weight.to(dtype)

    def storage_bits(self) -> int:
        """Exact number of bits this weight needs in storage (see the module docstring)."""
        out_features, in_features = self.codes.shape
        n_outliers = 0 if self.outlier_idx is None else int(self.outlier_idx.numel())
        n_groups = self.scales.shape[1]
        zero_bits = {"int": self.bits, "float": 16, "none": 0}[self.zero_format]
        total = out_features * (in_features - n_outliers) * self.bits
        total += out_features * n_groups * (self.scale_bits + zero_bits)
        if not self.groups_contiguous:
            total += 32 * in_features
        total += n_outliers * (16 * out_features + 32)
        return total

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel
