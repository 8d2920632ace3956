"""bitsandbytes' 4-bit data types as data-free baselines: `method=nf4` and `method=fp4`.

QLoRA's recipe (Dettmers et al., 2023; bitsandbytes `quantize_4bit`), per linear:

1. Flatten W row-major and cut it into blocks of `group_size` (bnb's `blocksize`, default 64)
   consecutive weights; the last block may be short.
2. absmax_k = max |w| over block k; each weight is scaled to w * (1 / absmax_k), clamped to [-1, 1]
   (the short last block divides by its absmax instead, a quirk of bnb's torch path kept here).
3. Each scaled weight takes the index of the nearest value of the 16-value table (NF4 or FP4,
   kernels/lookup.py): bnb bucketizes against the midpoints of the sorted table, so a value
   exactly on a midpoint goes to the lower one; FP4 indices are then mapped back to its
   bit-pattern order.
4. `double_quant` (bnb's `compress_statistics`): the absmax values minus their mean are quantized
   the same way with bnb's signed 8-bit dynamic map in blocks of 256, keeping one fp32 absmax per
   256 blocks and the mean (QLoRA's "double quantization").

Dequantization: table[code] * absmax (quantlab.kernels.lookup.LookupWeight). Tested bit for bit against
bitsandbytes itself (tests/methods/test_nf4.py). One difference is deliberate: on a CPU, bnb's
native `quantize_blockwise` (step 4 only) picks the 8-bit code through a 65,536-bin lookup table
that cannot resolve the nearest code near some midpoints; we take the exactly nearest code, as
bnb's CUDA kernel and its pure-torch backend do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantlab.kernels.lookup import LookupWeight, dynamic_map, lookup_table
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # bnb quantizes the absmax values in blocks of 256


@dataclass
class LookupConfig(MethodConfig):
    bits: int = 4
    group_size: int = 64  # bnb's blocksize
    double_quant: bool = False  # bnb's compress_statistics (transformers' bnb_4bit_use_double_quant)

    supported_bits: ClassVar[tuple[int, ...]] = (4,)

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.group_size not in BNB_BLOCKSIZES:
            raise ConfigError(
                f"method {method_name!r}: group_size={self.group_size} is not a bitsandbytes block size; "
                f"valid: {', '.join(map(str, BNB_BLOCKSIZES))} (set method.group_size; bnb's default is 64)"
            )


def blockwise_quantize(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into the sorted `code`, absmax per block) of the flat fp32 `values`: bnb's
    blockwise absmax quantizer (backends/default/ops.py), nearest code with ties to the lower."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:  # bnb divides the short last block by its absmax instead of multiplying
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True), absmax


def quantize_lookup(weight: torch.Tensor, table: str, blocksize: int = 64, double_quant: bool = False) -> LookupWeight:
    """A [out, in] weight as bnb's NF4 / FP4 (see the module docstring)."""
    values = lookup_table(table, weight.device)
    order = torch.argsort(values, stable=True)  # sorted position -> code (identity for NF4)
    sorted_index, absmax = blockwise_quantize(weight.detach(), values[order], blocksize)
    codes = order[sorted_index.long()].to(torch.uint8).reshape(weight.shape)
    if not double_quant:
        return LookupWeight(codes=codes, table=table, blocksize=blocksize, absmax=absmax)
    offset = absmax.mean()
    absmax_codes, absmax_scales = blockwise_quantize(absmax - offset, dynamic_map(weight.device), NESTED_BLOCKSIZE)
    return LookupWeight(
        codes=codes, table=table, blocksize=blocksize, absmax_codes=absmax_codes.to(torch.uint8),
        absmax_scales=absmax_scales, absmax_offset=offset.reshape(1), absmax_blocksize=NESTED_BLOCKSIZE,
    )


class _Lookup4bit(Method):
    config_class = LookupConfig
    needs_calibration = False
    table: ClassVar[str]

    def quantize_block(self, block: BlockView) -> None:
        for name, linear in block.linears.items():
            start = time.perf_counter()
            qweight = quantize_lookup(linear.weight, self.table, self.config.group_size, self.config.double_quant)
            block.commit(name, qweight, seconds=time.perf_counter() - start, table=self.table,
                         double_quant=self.config.double_quant)


@register("nf4")
class NF4(_Lookup4bit):
    table = "nf4"


@register("fp4")
class FP4(_Lookup4bit):
    table = "fp4"
