"""Codebook (vector-quantized) weights: VPTQ's format (reference/methods.md §7).

Layout of a `CodebookWeight` of shape (out, in):

- `perm` [in] (optional): column permutation, permuted position p holds original column
  perm[p] (W_perm = W[:, perm], as `argsort(diag H, descending)` gives it). Without it, the
  identity.
- Column partitions, in order, tile the permuted columns [0, in): partition i covers permuted
  columns [start, end) with its own codebook. A vector is v consecutive output rows of one column:
  column c, vector row r holds rows r*v .. r*v + v - 1; the output dimension is zero-padded to a
  multiple of v (ceil(out / v) vector rows) and the padding rows are dropped on dequantize.
  Each partition has `centroids` [k, v] and `indices` [ceil(out / v), n_cols] (index of vector
  (r, c) at [r, c]); optionally `residual_centroids` [k2, v] and `residual_indices` (same shape),
  the vector then being centroids[i] + residual_centroids[i2] (VPTQ's residual VQ). VPTQ's
  outlier partition is just the first partition, with its own (v0, k0).
- Per-column normalization (optional, VPTQ's `enable_norm`): `col_scale` s and `col_bias` b, [in]
  each, in the ORIGINAL column order (VPTQ normalizes before permuting and stores
  weight_scale / weight_bias per original column): W[:, j] = W'[:, j] * s[j] + b[j], where W' is
  the codebook reconstruction un-permuted. Either may be absent (s = 1, b = 0).

dequantize(): W'_perm from the partitions; W'[:, perm] = W'_perm; W = W' * s + b (fp32).

Storage convention (`storage_bits`):
- indices: ceil(log2 k) bits each (+ ceil(log2 k2) per residual index), ceil(out / v) * n_cols
  per partition (the padded vector rows are real vectors);
- centroids: 16 bits (fp16) per value, k * v (+ k2 * v residual) per partition;
- perm: 32 bits per column when present (int32; VPTQ's packed mode uses int16, which would cost
  16 — we keep int32 so that any in_features fits);
- col_scale, col_bias: 16 bits (fp16) per column each, when present.
VPTQ's own count (§8) leaves out the perm, the normalization and the padding; ours does not.

Packed layout (`pack()`): "perm" int32, "col_scale" / "col_bias" fp16, and per partition i
"partition{i}.centroids" fp16, "partition{i}.indices", and the residual pair. Indices of
b = ceil(log2 k) <= 8 bits are kernels/packing.py bitstreams, one per vector row along the
columns ([ceil(out / v), ceil(n_cols * b / 32)] int32); 9..16 bits are int16 holding the unsigned
16-bit pattern (index 40000 is stored as 40000 - 65536); above, int32.
padding_bits() = per index tensor, its container bits minus b per index: the zero bits that
round each bitstream row to whole words, or 16 - b (int16) / 32 - b (int32) per index.

As stored (`rounded_to_storage()`, and what `unpack` returns): centroids, col_scale and col_bias
fp16, indices and perm int32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from quantlab.kernels.format import WeightFormat, fresh
from quantlab.kernels.packing import pack_codes, packed_words, unpack_codes

_PACKED_MAX_BITS = 8  # up to here indices are bitstreams; above, int16 / int32 containers


def index_bits(k: int) -> int:
    """Bits of one index into a k-entry codebook: ceil(log2 k)."""
    return (k - 1).bit_length()


def _container_bits(bits: int) -> int | None:
    """Bits per index of the int container, or None for a bitstream."""
    if bits <= _PACKED_MAX_BITS:
        return None
    return 16 if bits <= 16 else 32


def _pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    container = _container_bits(bits)
    if container is None:
        return pack_codes(indices, bits)
    wide = indices.to(torch.int64)
    if container == 16:
        return torch.where(wide >= 1 << 15, wide - (1 << 16), wide).to(torch.int16).contiguous()
    return wide.to(torch.int32).contiguous()


def _unpack_indices(stored: torch.Tensor, bits: int, n_cols: int) -> torch.Tensor:
    container = _container_bits(bits)
    if container is None:
        return unpack_codes(stored, bits, n_cols).to(torch.int32)
    if container == 16:
        return stored.to(torch.int32) & 0xFFFF
    return stored.to(torch.int32)


def _index_padding(n_rows: int, n_cols: int, bits: int) -> int:
    container = _container_bits(bits)
    if container is None:
        return n_rows * (packed_words(n_cols, bits) * 32 - n_cols * bits)
    return n_rows * n_cols * (container - bits)


def nearest_centroid(vectors: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Index [n] of the nearest centroid (exact squared L2 in fp32, first index on ties) of each
    vector [n, v] among centroids [k, v]; in chunks of about `chunk` distances."""
    vectors, centroids = vectors.float(), centroids.float()
    step = max(1, chunk // max(1, centroids.shape[0]))
    out = [
        (vectors[i : i + step, None, :] - centroids[None]).pow(2).sum(-1).argmin(dim=1)
        for i in range(0, vectors.shape[0], step)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=vectors.device)


@dataclass
class CodebookPartition:
    """Permuted columns [start, end) sharing one codebook (see the module docstring)."""

    start: int
    end: int
    centroids: torch.Tensor  # [k, v]
    indices: torch.Tensor  # [ceil(out / v), end - start] int
    residual_centroids: torch.Tensor | None = None  # [k2, v]
    residual_indices: torch.Tensor | None = None  # like indices

    @property
    def n_cols(self) -> int:
        return self.end - self.start

    @property
    def vector_len(self) -> int:
        return self.centroids.shape[1]

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def k_res(self) -> int:
        """Residual codebook size; 0 without one."""
        return 0 if self.residual_centroids is None else self.residual_centroids.shape[0]

    @property
    def has_residual(self) -> bool:
        return self.residual_centroids is not None

    def check(self, out_features: int) -> None:
        if self.end <= self.start:
            raise ValueError(f"partition [{self.start}, {self.end}) is empty")
        if self.centroids.dim() != 2 or self.k < 2 or self.vector_len < 1:
            raise ValueError(f"centroids must be [k >= 2, v >= 1], got {tuple(self.centroids.shape)}")
        n_rows = -(-out_features // self.vector_len)
        if self.indices.shape != (n_rows, self.n_cols):
            raise ValueError(
                f"indices of partition [{self.start}, {self.end}) have shape {tuple(self.indices.shape)}, "
                f"expected ({n_rows}, {self.n_cols}) for v = {self.vector_len}"
            )
        if (self.residual_centroids is None) != (self.residual_indices is None):
            raise ValueError("residual_centroids and residual_indices come together")
        if self.residual_centroids is not None:
            if self.residual_centroids.dim() != 2 or self.residual_centroids.shape[1] != self.vector_len or self.k_res < 2:
                raise ValueError(
                    f"residual centroids must be [k2 >= 2, {self.vector_len}], got {tuple(self.residual_centroids.shape)}"
                )
            if self.residual_indices.shape != self.indices.shape:
                raise ValueError("residual_indices must have the shape of indices")

    def check_indices(self) -> None:
        for name, idx, k in (("indices", self.indices, self.k), ("residual_indices", self.residual_indices, self.k_res)):
            if idx is None or not idx.numel():
                continue
            if idx.is_floating_point() or idx.dtype == torch.bool:
                raise TypeError(f"{name} must have an integer dtype, got {idx.dtype}")
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"{name} must lie in [0, {k - 1}] for a {k}-entry codebook, got [{lo}, {hi}]")

    def dequantize_columns(self, out_features: int) -> torch.Tensor:
        """The [out, n_cols] fp32 block of permuted columns [start, end) before normalization."""
        vectors = self.centroids.float()[self.indices.long()]  # [rows, n_cols, v]
        if self.residual_centroids is not None:
            vectors = vectors + self.residual_centroids.float()[self.residual_indices.long()]
        n_rows = vectors.shape[0]
        return vectors.permute(0, 2, 1).reshape(n_rows * self.vector_len, self.n_cols)[:out_features]

    def storage_bits(self) -> int:
        n_indices = self.indices.numel()
        total = n_indices * index_bits(self.k) + 16 * self.k * self.vector_len
        if self.has_residual:
            total += n_indices * index_bits(self.k_res) + 16 * self.k_res * self.vector_len
        return total

    def padding_bits(self) -> int:
        n_rows = self.indices.shape[0]
        total = _index_padding(n_rows, self.n_cols, index_bits(self.k))
        if self.has_residual:
            total += _index_padding(n_rows, self.n_cols, index_bits(self.k_res))
        return total


@dataclass
class CodebookWeight(WeightFormat):
    format_name: ClassVar[str] = "codebook"

    out_features: int
    in_features: int
    partitions: list[CodebookPartition]
    perm: torch.Tensor | None = None  # [in]: permuted position p holds original column perm[p]
    col_scale: torch.Tensor | None = None  # [in], original column order
    col_bias: torch.Tensor | None = None  # [in], original column order
    info: dict = field(default_factory=dict)  # free-form, JSON-serializable; travels in meta()

    def __post_init__(self) -> None:
        if not self.partitions:
            raise ValueError("a codebook weight needs at least one partition")
        expected_start = 0
        for part in self.partitions:
            if part.start != expected_start:
                raise ValueError(
                    f"partitions must tile the columns in order: one starts at {part.start}, expected {expected_start}"
                )
            part.check(self.out_features)
            expected_start = part.end
        if expected_start != self.in_features:
            raise ValueError(f"partitions cover {expected_start} columns, expected {self.in_features}")
        for name in ("perm", "col_scale", "col_bias"):
            t = getattr(self, name)
            if t is not None and t.shape != (self.in_features,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({self.in_features},)")
        if self.perm is not None:
            ordered = torch.sort(self.perm.long().cpu()).values
            if not torch.equal(ordered, torch.arange(self.in_features)):
                raise ValueError("perm must be a permutation of the input columns")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        device = self.partitions[0].centroids.device
        permuted = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=device)
        for part in self.partitions:
            permuted[:, part.start : part.end] = part.dequantize_columns(self.out_features)
        if self.perm is None:
            weight = permuted
        else:
            weight = torch.empty_like(permuted)
            weight[:, self.perm.long().to(device)] = permuted
        if self.col_scale is not None:
            weight = weight * self.col_scale.float().to(device)
        if self.col_bias is not None:
            weight = weight + self.col_bias.float().to(device)
        return weight.to(dtype)

    def storage_bits(self) -> int:
        total = sum(part.storage_bits() for part in self.partitions)
        if self.perm is not None:
            total += 32 * self.in_features
        total += 16 * self.in_features * ((self.col_scale is not None) + (self.col_bias is not None))
        return total

    def padding_bits(self) -> int:
        return sum(part.padding_bits() for part in self.partitions)

    def _check_storable(self) -> None:
        for part in self.partitions:
            part.check_indices()
            for c in (part.centroids, part.residual_centroids):
                if c is not None and not bool(torch.isfinite(c.to(torch.float16)).all()):
                    raise ValueError("centroids are not finite in fp16")
        for t in (self.col_scale, self.col_bias):
            if t is not None and not bool(torch.isfinite(t.to(torch.float16)).all()):
                raise ValueError("col_scale / col_bias are not finite in fp16")

    def pack(self) -> dict[str, torch.Tensor]:
        self._check_storable()
        tensors: dict[str, torch.Tensor] = {}
        if self.perm is not None:
            tensors["perm"] = fresh(self.perm, torch.int32)
        if self.col_scale is not None:
            tensors["col_scale"] = fresh(self.col_scale, torch.float16)
        if self.col_bias is not None:
            tensors["col_bias"] = fresh(self.col_bias, torch.float16)
        for i, part in enumerate(self.partitions):
            tensors[f"partition{i}.centroids"] = fresh(part.centroids, torch.float16)
            tensors[f"partition{i}.indices"] = _pack_indices(part.indices, index_bits(part.k))
            if part.has_residual:
                tensors[f"partition{i}.residual_centroids"] = fresh(part.residual_centroids, torch.float16)
                tensors[f"partition{i}.residual_indices"] = _pack_indices(part.residual_indices, index_bits(part.k_res))
        return tensors

    def meta(self) -> dict[str, Any]:
        return {
            "format_name": self.format_name,
            "version": 1,
            "shape": [self.out_features, self.in_features],
            "partitions": [
                {"start": p.start, "end": p.end, "vector_len": p.vector_len, "k": p.k, "k_res": p.k_res}
                for p in self.partitions
            ],
            "perm": self.perm is not None,
            "col_scale": self.col_scale is not None,
            "col_bias": self.col_bias is not None,
            "info": dict(self.info),
        }

    @classmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> CodebookWeight:
        cls.check_meta(meta)
        out_features, in_features = meta["shape"]
        partitions = []
        for i, spec in enumerate(meta["partitions"]):
            n_cols = spec["end"] - spec["start"]
            centroids = tensors[f"partition{i}.centroids"]
            indices = _unpack_indices(tensors[f"partition{i}.indices"], index_bits(spec["k"]), n_cols)
            residual_centroids = residual_indices = None
            if spec["k_res"]:
                residual_centroids = tensors[f"partition{i}.residual_centroids"]
                residual_indices = _unpack_indices(
                    tensors[f"partition{i}.residual_indices"], index_bits(spec["k_res"]), n_cols
                )
            partitions.append(
                CodebookPartition(spec["start"], spec["end"], centroids, indices, residual_centroids, residual_indices)
            )
        return cls(
            out_features=out_features,
            in_features=in_features,
            partitions=partitions,
            perm=tensors["perm"] if meta["perm"] else None,
            col_scale=tensors["col_scale"] if meta["col_scale"] else None,
            col_bias=tensors["col_bias"] if meta["col_bias"] else None,
            info=dict(meta.get("info", {})),
        )

    def rounded_to_storage(self) -> CodebookWeight:
        """This weight as `pack()` stores it: fp16 centroids and normalization, int32 indices / perm."""
        self._check_storable()

        def half(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(torch.float16).clone()

        def int32(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(torch.int32).clone()

        partitions = [
            CodebookPartition(
                p.start, p.end, half(p.centroids), int32(p.indices), half(p.residual_centroids), int32(p.residual_indices)
            )
            for p in self.partitions
        ]
        return CodebookWeight(
            self.out_features, self.in_features, partitions,
            perm=int32(self.perm), col_scale=half(self.col_scale), col_bias=half(self.col_bias), info=dict(self.info),
        )

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bounds: list[tuple[int, int]],
        centroids: list[torch.Tensor],
        residual_centroids: list[torch.Tensor | None] | None = None,
        perm: torch.Tensor | None = None,
        normalize: bool = False,
    ) -> CodebookWeight:
        """Nearest-centroid assignment of a dense [out, in] weight (no error feedback: a reference
        and test helper, not VPTQ). `bounds` are the partitions' permuted column ranges, with
        `centroids[i]` [k, v] for each (and optional residual codebooks, assigned greedily to what
        the main centroid leaves, as VPTQ does). `normalize`: per column s = max - min (1 where
        the column is constant), b = min, rounded to fp16 before use, as VPTQ's `enable_norm`."""
        w = weight.detach().float()
        out_features, in_features = w.shape
        col_scale = col_bias = None
        if normalize:
            lo, hi = w.min(dim=0).values, w.max(dim=0).values
            span = hi - lo
            col_scale = torch.where(span > 0, span, torch.ones_like(span)).to(torch.float16)
            col_bias = lo.to(torch.float16)
            w = (w - col_bias.float()) / col_scale.float()
        if perm is not None:
            w = w[:, perm.long().to(w.device)]
        residual_centroids = residual_centroids or [None] * len(bounds)
        partitions = []
        for (start, end), book, res_book in zip(bounds, centroids, residual_centroids):
            v = book.shape[1]
            n_rows = -(-out_features // v)
            block = F.pad(w[:, start:end], (0, 0, 0, n_rows * v - out_features))  # zero rows up to a multiple of v
            vectors = block.reshape(n_rows, v, end - start).permute(0, 2, 1).reshape(-1, v)  # row-major (r, c)
            idx = nearest_centroid(vectors, book)
            res_idx = None
            if res_book is not None:
                res_idx = nearest_centroid(vectors - book.float()[idx], res_book)
                res_idx = res_idx.view(n_rows, end - start).to(torch.int32)
            partitions.append(
                CodebookPartition(start, end, book, idx.view(n_rows, end - start).to(torch.int32), res_book, res_idx)
            )
        return cls(out_features, in_features, partitions, perm=perm, col_scale=col_scale, col_bias=col_bias)
