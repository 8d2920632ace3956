"""Low-bit formats: quantized weights, exact bit accounting, and (later) packed modules and kernels."""

from kernels.quantized_weight import QuantizedWeight

__all__ = ["QuantizedWeight"]
