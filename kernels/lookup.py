"""Lookup-table weights: bitsandbytes' 4-bit data types (NF4, FP4) with blockwise absmax scales.

A `LookupWeight` of shape (out, in) holds a 4-bit index per weight into a fixed 16-value table
(`TABLES`) and one absmax scale per block of `blocksize` consecutive weights of the row-major
flattened matrix, exactly as bitsandbytes lays a tensor out (`quantize_4bit` flattens it; a block
may straddle two rows when `in` is not a multiple of `blocksize`, and the last block may be
short). With k the block of flat position p = r * in + c:

    W[r, c] = TABLES[table][codes[r, c]] * absmax[k],   k = p // blocksize   (fp32, as bnb computes it)

The tables are bitsandbytes' published values (`get_4bit_type`), transcribed literally below and
pinned by tests against the library: NF4 is QLoRA's NormalFloat (quantiles of N(0, 1), sorted,
index = position), FP4 is bnb's e2m1 float with exponent bias 2 in its own bit-pattern order
(index 0b0xxx positive, 0b1xxx negative; values / 12).

Double quantization (QLoRA §3, bnb's `compress_statistics=True`): the fp32 absmax values are
replaced by 8-bit codes. bnb subtracts their mean (`offset`), quantizes the centred values in
blocks of 256 with its signed 8-bit dynamic map (`dynamic_map()`, blockwise absmax again), and
keeps one fp32 absmax per 256 blocks (`state2.absmax`):

    absmax[k] = DYNAMIC[absmax_codes[k]] * absmax_scales[k // 256] + absmax_offset

Storage convention (`storage_bits`):
- codes: 4 bits per weight;
- absmax: 32 bits (fp32, as bnb stores it) per block; with double quantization instead 8 bits
  per block, 32 bits per group of `absmax_blocksize` blocks (the last may be short) and 32 bits
  for the offset;
- the 16-value table and the 256-value dynamic map are constants of the format, named by
  `meta()` and not stored (bnb's serialized checkpoints repeat them per tensor as `quant_map`,
  16 fp32 values, and `nested_quant_map`, 256 fp32 values: 8,704 bits per linear that we do not
  count). Shape and block sizes are metadata, as in every format here.
So NF4 at blocksize 64 costs 4 + 32 / 64 = 4.5 bits per weight, and with double quantization
4 + 8 / 64 + 32 / (64 * 256) + 32 / numel, about 4.127.

Packed layout (`pack()`): "codes" [out, ceil(in * 4 / 32)] int32 (kernels/packing.py's LSB-first
4-bit bitstream per row; bnb's own byte order, two codes per uint8 with the first in the high
nibble, belongs to its kernels, not to storage); "absmax" fp32 [n_blocks]; or with double
quantization "absmax_codes" uint8 [n_blocks], "absmax_scales" fp32 [n_groups], "absmax_offset"
fp32 [1]. padding_bits() = the zero bits that round each row's code bitstream up to whole words.
Every stored float is fp32, so `rounded_to_storage()` changes nothing but containers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from quantlab.kernels.format import WeightFormat, fresh
from quantlab.kernels.packing import pack_codes, packed_words, unpack_codes

CODE_BITS = 4

# bitsandbytes' `get_4bit_type` (functional.py), as published there: NF4 =
# create_normal_map(offset=0.9677083, use_extra_value=True), already in [-1, 1].
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4 in bit-pattern order (sign bit 3; 0b001 is the subnormal 0.0625), divided by its absmax 12.
# bnb writes the negative zero as the integer `-0`, which is +0.0: code 8 is +0.0 there, and here.
_FP4_RAW = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
_FP4 = [v / 12.0 for v in _FP4_RAW]
TABLES: dict[str, tuple[float, ...]] = {"nf4": tuple(_NF4), "fp4": tuple(_FP4)}


def lookup_table(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 fp32 values of table `name` ("nf4" or "fp4"), indexed by code."""
    if name not in TABLES:
        raise ValueError(f"unknown 4-bit table {name!r}; known: {', '.join(TABLES)}")
    return torch.tensor(TABLES[name], dtype=torch.float32, device=device)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7)),
    the code of double-quantized absmax values: 256 sorted fp32 values in [-0.99297, 1].

    For exponent level i = 0..6 the 2^i means of consecutive points of linspace(0.1, 1, 2^i + 1)
    (fp32), scaled by 10^(i - 6), with both signs; then 0 and 1. Computed in fp32 as bnb does."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def n_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


@dataclass
class LookupWeight(WeightFormat):
    format_name: ClassVar[str] = "lookup"

    codes: torch.Tensor  # [out, in] indices into TABLES[table]
    table: str  # "nf4" | "fp4"
    blocksize: int  # weights per absmax block, along the row-major flattened weight
    absmax: torch.Tensor | None = None  # [n_blocks] fp32 (without double quantization)
    absmax_codes: torch.Tensor | None = None  # [n_blocks] indices into dynamic_map()
    absmax_scales: torch.Tensor | None = None  # [ceil(n_blocks / absmax_blocksize)] fp32
    absmax_offset: torch.Tensor | None = None  # [1] fp32: the mean the codes are centred on
    absmax_blocksize: int = 256
    info: dict = field(default_factory=dict)  # free-form, JSON-serializable; travels in meta()

    def __post_init__(self) -> None:
        if self.codes.dim() != 2:
            raise ValueError(f"codes must be [out, in], got shape {tuple(self.codes.shape)}")
        if self.table not in TABLES:
            raise ValueError(f"unknown 4-bit table {self.table!r}; known: {', '.join(TABLES)}")
        if self.blocksize < 1 or self.absmax_blocksize < 1:
            raise ValueError(f"block sizes must be positive, got {self.blocksize} and {self.absmax_blocksize}")
        blocks = n_blocks(self.codes.numel(), self.blocksize)
        nested = (self.absmax_codes, self.absmax_scales, self.absmax_offset)
        if self.absmax is not None:
            if any(t is not None for t in nested):
                raise ValueError("give either absmax or the double-quantized absmax_codes/scales/offset, not both")
            if self.absmax.shape != (blocks,):
                raise ValueError(f"absmax has shape {tuple(self.absmax.shape)}, expected ({blocks},)")
            return
        if any(t is None for t in nested):
            raise ValueError("a lookup weight needs absmax, or absmax_codes, absmax_scales and absmax_offset")
        groups = n_blocks(blocks, self.absmax_blocksize)
        if self.absmax_codes.shape != (blocks,):
            raise ValueError(f"absmax_codes has shape {tuple(self.absmax_codes.shape)}, expected ({blocks},)")
        if self.absmax_scales.shape != (groups,):
            raise ValueError(f"absmax_scales has shape {tuple(self.absmax_scales.shape)}, expected ({groups},)")
        if self.absmax_offset.numel() != 1:
            raise ValueError(f"absmax_offset must hold one value, got shape {tuple(self.absmax_offset.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.codes.shape
        return int(out_features), int(in_features)

    @property
    def bits(self) -> int:
        """The nominal width (what records report): 4."""
        return CODE_BITS

    @property
    def group_size(self) -> int:
        """Weights per absmax block (records call it the group size, as for every format)."""
        return self.blocksize

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def n_blocks(self) -> int:
        return n_blocks(self.numel, self.blocksize)

    # ---- values -------------------------------------------------------------------------------

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block [n_blocks] (double quantization undone as bnb does)."""
        if self.absmax is not None:
            return self.absmax.float()
        code = dynamic_map(self.absmax_codes.device)
        values = code[self.absmax_codes.long()]
        scales = self.absmax_scales.float().repeat_interleave(self.absmax_blocksize)[: values.numel()]
        return values * scales + self.absmax_offset.float().reshape(())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        table = lookup_table(self.table, self.codes.device)
        values = table[self.codes.long()].reshape(-1)
        scales = self.block_absmax().to(values.device).repeat_interleave(self.blocksize)[: values.numel()]
        return (values * scales).reshape(self.shape).to(dtype)

    def storage_bits(self) -> int:
        """Exact bits (see the module docstring)."""
        total = CODE_BITS * self.numel
        if self.absmax is not None:
            return total + 32 * self.n_blocks
        return total + 8 * self.n_blocks + 32 * n_blocks(self.n_blocks, self.absmax_blocksize) + 32

    def padding_bits(self) -> int:
        out_features, in_features = self.shape
        return out_features * (packed_words(in_features, CODE_BITS) * 32 - in_features * CODE_BITS)

    # ---- storage ------------------------------------------------------------------------------

    def validate(self) -> None:
        for name, t, k in (("codes", self.codes, 16), ("absmax_codes", self.absmax_codes, 256)):
            if t is None or not t.numel():
                continue
            if t.is_floating_point() or t.dtype == torch.bool:
                raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
            if int(t.min()) < 0 or int(t.max()) >= k:
                raise ValueError(f"{name} must lie in [0, {k - 1}]")
        for name in ("absmax", "absmax_scales", "absmax_offset"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t.float()).all()):
                raise ValueError(f"{name} is not finite")

    def rounded_to_storage(self) -> LookupWeight:
        self.validate()
        return LookupWeight(
            codes=self.codes.to(torch.uint8).clone(),
            table=self.table,
            blocksize=self.blocksize,
            absmax=None if self.absmax is None else self.absmax.to(torch.float32).clone(),
            absmax_codes=None if self.absmax_codes is None else self.absmax_codes.to(torch.uint8).clone(),
            absmax_scales=None if self.absmax_scales is None else self.absmax_scales.to(torch.float32).clone(),
            absmax_offset=None if self.absmax_offset is None else self.absmax_offset.to(torch.float32).reshape(1).clone(),
            absmax_blocksize=self.absmax_blocksize,
            info=dict(self.info),
        )

    def pack(self) -> dict[str, torch.Tensor]:
        self.validate()
        tensors = {"codes": pack_codes(self.codes, CODE_BITS)}
        if self.absmax is not None:
            tensors["absmax"] = fresh(self.absmax, torch.float32)
        else:
            tensors["absmax_codes"] = fresh(self.absmax_codes, torch.uint8)
            tensors["absmax_scales"] = fresh(self.absmax_scales, torch.float32)
            tensors["absmax_offset"] = fresh(self.absmax_offset.reshape(1), torch.float32)
        return tensors

    def meta(self) -> dict[str, Any]:
        return {
            "format_name": self.format_name,
            "version": 1,
            "shape": list(self.shape),
            "table": self.table,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "absmax_blocksize": self.absmax_blocksize,
            "info": dict(self.info),
        }

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> LookupWeight:
        cls.check_meta(meta)
        _, in_features = meta["shape"]
        codes = unpack_codes(tensors["codes"], CODE_BITS, in_features)
        common = {"codes": codes, "table": meta["table"], "blocksize": meta["blocksize"],
                  "absmax_blocksize": meta["absmax_blocksize"], "info": dict(meta.get("info", {}))}
        if not meta["double_quant"]:
            return cls(absmax=tensors["absmax"], **common)
        return cls(absmax_codes=tensors["absmax_codes"], absmax_scales=tensors["absmax_scales"],
                   absmax_offset=tensors["absmax_offset"], **common)
