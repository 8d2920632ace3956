"""The protocol every quantized weight implements, and the registry of formats.

A weight format is a quantized [out, in] matrix that can

- rebuild its dense weight: `dequantize(dtype)` (what evaluation multiplies by);
- count its exact logical storage: `storage_bits()`, the number every bits-per-weight in a record
  comes from (reference/methods.md §8), never a nominal width;
- store itself: `pack()` gives named tensors ready for safetensors (contiguous, each its own
  storage, on the weight's device) and `meta()` the JSON-serializable rest (including
  `format_name`); `unpack(tensors, meta)` (or `format_from_packed`) rebuilds it;
- run: `matmul(x) = x @ dequantize(x.dtype).T`, the reference path every fast kernel is tested
  against.

Bit accounting. `packed_bits()` is what `pack()` really occupies (sum of numel * element size);
`storage_bits()` counts each stored value at its logical width; `padding_bits()` is the difference,
which each format documents and computes exactly (zero bits that round bitstreams up to whole
32-bit words, indices held in a wider container), so that
packed_bits() == storage_bits() + padding_bits() holds for every weight.

Storage precision. Packed scales, centroids and fp16 columns are half precision, so a round trip
returns the weight *as stored*: `rounded_to_storage()` gives that weight without packing, and
unpack(pack(w)) equals w.rounded_to_storage() field by field (its dequantize() bit for bit).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

FORMATS: dict[str, type[WeightFormat]] = {}


class WeightFormat(ABC):
    """A quantized [out, in] weight (see the module docstring). Subclasses set `format_name`
    and are registered in FORMATS under it."""

    format_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("format_name")
        if name is not None:
            if name in FORMATS and FORMATS[name] is not cls:
                raise ValueError(f"weight format {name!r} is already registered by {FORMATS[name].__name__}")
            FORMATS[name] = cls

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""

    @property
    def numel(self) -> int:
        out_features, in_features = self.shape
        return out_features * in_features

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] weight this format represents."""

    @abstractmethod
    def storage_bits(self) -> int:
        """Exact logical bits needed to store this weight (each format documents its convention)."""

    @abstractmethod
    def padding_bits(self) -> int:
        """packed_bits() - storage_bits(), computed from the layout (each format documents it)."""

    @abstractmethod
    def pack(self) -> dict[str, torch.Tensor]:
        """Named tensors ready for safetensors: contiguous, not sharing storage with each other
        or with this weight."""

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """Everything besides the tensors that `unpack` needs; JSON-serializable; has format_name."""

    @classmethod
    @abstractmethod
    def unpack(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> WeightFormat:
        """Rebuild the weight from `pack()` and `meta()` output."""

    @classmethod
    def check_meta(cls, meta: dict[str, Any]) -> None:
        """`unpack`'s first step: refuse another format's metadata."""
        if meta.get("format_name") != cls.format_name:
            raise ValueError(f"not a {cls.format_name} weight: format_name {meta.get('format_name')!r}")

    @abstractmethod
    def rounded_to_storage(self) -> WeightFormat:
        """This weight as `pack()` stores it (half-precision scales, ...), without packing."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T with W = dequantize(x.dtype): the reference path."""
        return x @ self.dequantize(x.dtype).to(x.device).T

    def to(self, device: torch.device | str) -> WeightFormat:
        """The same weight with every tensor on `device` (formats are dataclasses of tensors,
        lists and nested dataclasses); self when nothing moves."""
        return _to_device(self, torch.device(device))

    def packed_bits(self) -> int:
        """Bits `pack()` occupies: sum over its tensors of numel * element size * 8."""
        return sum(t.numel() * t.element_size() * 8 for t in self.pack().values())

    def bits_per_weight(self) -> float:
        return self.storage_bits() / self.numel


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _to_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def format_from_packed(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> WeightFormat:
    """Rebuild any registered format from its `pack()` tensors and `meta()`."""
    name = meta.get("format_name")
    if name not in FORMATS:
        raise ValueError(f"unknown weight format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name].unpack(tensors, meta)


def fresh(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous copy of `t` (in `dtype`) that shares no storage: what pack() hands out."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        return t.to(dtype).contiguous()  # the conversion already allocated new storage
    return t.clone(memory_format=torch.contiguous_format)
