"""The full-precision baseline: no weight is touched ("fp16" is the field's name whatever the dtype)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantlab.methods.base import Method, MethodConfig, register
from quantlab.methods.block import BlockView


@dataclass
class FP16Config(MethodConfig):
    bits: int = 16
    group_size: int = -1
    supported_bits: ClassVar[tuple[int, ...]] = (16,)


@register("fp16")
class FullPrecision(Method):
    config_class = FP16Config
    needs_calibration = False
    quantizes_weights = False

    def quantize_block(self, block: BlockView) -> None:
        return None
