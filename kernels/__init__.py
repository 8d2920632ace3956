"""Low-bit weight formats: a floor every method builds on.

- `grid`: uniform scalar grids: a range -> (scale, zero), the code <-> value rule (weights and
  activations share it; methods/quantizer.py re-exports it and adds the clip searches).
- `groups`: which input columns share a (scale, zero): group bounds, g_idx, batched segments.
- `packing`: LSB-first bitstreams of 1..16-bit values in int32 words.
- `format`: the `WeightFormat` protocol (dequantize, storage_bits, pack / unpack, matmul) and the
  FORMATS registry.
- `uniform`: `UniformWeight` (alias `QuantizedWeight`), group-wise uniform grids with per-group
  widths, g_idx and fp16 outlier columns (RTN, GPTQ, AWQ, OWQ, SliM-LLM).
- `codebook`: `CodebookWeight`, vector-quantized weights (VPTQ).
- `lookup`: `LookupWeight`, bitsandbytes' 4-bit lookup tables (NF4, FP4) with blockwise absmax
  scales and optional double quantization.
- `activations`: `ActivationQuantizer` / `ActivationFakeQuant`, fake-quant of a linear's input
  (bits, per-tensor / per-token, sym, dynamic / static ranges).
- `int8`: `Int8Linear`, W8A8 through torch._int_mm on the CPU, and its `benchmark`.
"""

from quantlab.kernels.codebook import CodebookPartition, CodebookWeight
from quantlab.kernels.format import FORMATS, WeightFormat, format_from_packed
from quantlab.kernels.groups import contiguous_g_idx, group_bounds, num_groups, segments
from quantlab.kernels.lookup import LookupWeight
from quantlab.kernels.packing import pack_codes, packed_words, unpack_codes
from quantlab.kernels.uniform import QuantizedWeight, UniformWeight

__all__ = [
    "FORMATS",
    "CodebookPartition",
    "CodebookWeight",
    "LookupWeight",
    "QuantizedWeight",
    "UniformWeight",
    "WeightFormat",
    "contiguous_g_idx",
    "format_from_packed",
    "group_bounds",
    "num_groups",
    "pack_codes",
    "packed_words",
    "segments",
    "unpack_codes",
]
