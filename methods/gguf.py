"""llama.cpp's own round-to-nearest for its legacy block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Data-free baselines (`method=gguf_q4_0` ...): every row is cut into blocks of 32 consecutive input
columns, and each block is quantized exactly as ggml's reference quantizers do
(`quantize_row_q4_0_ref` ... in ggml-quants.c; gguf-py's `gguf.quants` mirrors them in numpy,
and the tests check these functions against it bit for bit). In float32 throughout:

- Q4_0 / Q5_0 (symmetric, b = 4 / 5, h = 2^(b-1)): `m` = the block's value of largest magnitude
  (the first one on ties), d = m / -h, q = trunc(x / d + h + 0.5) clipped to [0, 2h - 1] (the
  multiplication is by id = 1 / d, as in ggml); stored d16 = fp16(d); x_hat = d16 * (q - h).
  The largest-magnitude weight lands exactly on code 0 (x / d = -h), so the grid reaches one
  step further on the side of that weight, and rounding is half-up, not to even.
- Q4_1 / Q5_1 (asymmetric, maxq = 2^b - 1): d = (max - min) / maxq, q = trunc((x - min) * id + 0.5),
  stored d16 = fp16(d) and m16 = fp16(min); x_hat = d16 * q + m16.
- Q8_0: d = max|x| / 127, q = round-half-away-from-zero(x * id) in [-127, 127]; x_hat = d16 * q.

Codes are fitted with the float32 d and stored with its fp16 rounding: that is llama.cpp's grid,
so the codes are theirs, not a refit on the rounded scale.

As `UniformWeight`s (so the runs save, reload, count bits and export like any other): group size
32; Q4_0 / Q5_0 / Q8_0 are symmetric grids (zero_format "none", implicit zero h = 2^(b-1); Q8_0's
signed q is stored as the code q + 128), scales d16 exactly, so the fake-quant weight is ggml's
dequantization bit for bit. Q4_1 / Q5_1 use a float zero-point: scale d16, zero -m16 / d16, so
scale * (code - zero) equals d16 * q + m16 up to float32 rounding (about one ulp of the weight;
the GGUF export recovers d16 and m16 bit for bit). A block whose fp16 scale is 0 (all its values
equal, or a range below fp16's smallest step) holds no information in its codes: ggml's value
there is m16 alone, stored as codes 0, scale |m16| and zero -sign(m16) (exactly m16).
Exact bits: Q4_0 4.5, Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5 per weight, ggml's own sizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantlab.kernels import UniformWeight
from quantlab.kernels.groups import contiguous_g_idx
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView

BLOCK = 32  # every legacy ggml type quantizes blocks of 32 consecutive values of a row


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: its name in GGUF, bit width and whether it stores a minimum."""

    name: str  # "Q4_0"
    bits: int
    symmetric: bool


BLOCK_TYPES = {
    "q4_0": BlockType("Q4_0", 4, True),
    "q4_1": BlockType("Q4_1", 4, False),
    "q5_0": BlockType("Q5_0", 5, True),
    "q5_1": BlockType("Q5_1", 5, False),
    "q8_0": BlockType("Q8_0", 8, True),
}


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """ggml's `id = d ? 1/d : 0` in float32."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), torch.div(torch.ones_like(d), safe))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """roundf(): half away from zero, computed as gguf-py's np_roundf does (no x + 0.5, which
    rounds up in float32 just below a half)."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def quantize_blocks(blocks: torch.Tensor, block_type: BlockType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's reference quantizer on float32 blocks [n, 32]: (q [n, 32] int64 unsigned codes as
    ggml stores them, except Q8_0's signed q; d [n] float32 before fp16 rounding; min [n] float32,
    the asymmetric types' minimum, zeros for the others)."""
    x = blocks.float()
    if block_type.name == "Q8_0":
        d = x.abs().amax(dim=1) / 127
        q = _round_half_away(x * _inverse(d)[:, None])
        return q.long(), d, torch.zeros_like(d)
    if block_type.symmetric:
        half = 2 ** (block_type.bits - 1)
        index = x.abs().argmax(dim=1, keepdim=True)  # the first largest magnitude, as np.argmax
        d = x.gather(1, index).squeeze(1) / -half
        q = torch.trunc(x * _inverse(d)[:, None] + (half + 0.5)).clamp(0, 2 * half - 1)
        return q.long(), d, torch.zeros_like(d)
    maxq = 2**block_type.bits - 1
    hi, lo = x.amax(dim=1), x.amin(dim=1)
    d = (hi - lo) / maxq
    q = torch.trunc((x - lo[:, None]) * _inverse(d)[:, None] + 0.5).clamp(0, maxq)
    return q.long(), d, lo


def quantize_weight(weight: torch.Tensor, block_type: BlockType) -> UniformWeight:
    """A [out, in] weight as llama.cpp quantizes it (module docstring); in must be a multiple of 32."""
    out_features, in_features = weight.shape
    if in_features % BLOCK:
        raise ValueError(
            f"{block_type.name} quantizes blocks of {BLOCK} consecutive input columns: a layer with "
            f"{in_features} input columns is not a whole number of blocks"
        )
    n_groups = in_features // BLOCK
    q, d, lo = quantize_blocks(weight.detach().float().reshape(-1, BLOCK), block_type)
    d16 = d.to(torch.float16).float()
    if block_type.name == "Q8_0":
        codes = q + 128
        zeros = torch.full_like(d16, 128.0)
        zero_format = "none"
    elif block_type.symmetric:
        codes = q
        zeros = torch.full_like(d16, float(2 ** (block_type.bits - 1)))
        zero_format = "none"
    else:
        m16 = lo.to(torch.float16).float()
        empty = d16 == 0  # ggml's value there is m16 whatever the codes (module docstring)
        codes = torch.where(empty[:, None], torch.zeros_like(q), q)
        zeros = torch.where(empty, -torch.sign(m16), -m16 / torch.where(empty, torch.ones_like(d16), d16))
        d16 = torch.where(empty, m16.abs(), d16)
        zero_format = "float"
    return UniformWeight(
        codes=codes.reshape(out_features, in_features).to(torch.uint8),
        scales=d16.reshape(out_features, n_groups),
        zeros=zeros.reshape(out_features, n_groups),
        g_idx=contiguous_g_idx(in_features, BLOCK),
        bits=block_type.bits,
        group_size=BLOCK,
        zero_format=zero_format,
        info={"gguf_type": block_type.name},
    )


@dataclass
class GGUFConfig(MethodConfig):
    """bits and group_size are fixed by the block type (4 / 5 / 8 bits, blocks of 32)."""

    bits: int = 4
    group_size: int = BLOCK
    block_type: ClassVar[BlockType] = BLOCK_TYPES["q4_0"]

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.group_size != BLOCK:
            raise ConfigError(
                f"method {method_name!r} quantizes blocks of {BLOCK} columns: group_size={self.group_size} "
                f"cannot apply; drop it (the method's config sets group_size: {BLOCK})"
            )


class GGUFBaseline(Method):
    needs_calibration = False

    def quantize_block(self, block: BlockView) -> None:
        for name, linear in block.linears.items():
            start = time.perf_counter()
            qweight = quantize_weight(linear.weight, self.config.block_type)
            block.commit(name, qweight, seconds=time.perf_counter() - start)


@dataclass
class Q4_0Config(GGUFConfig):
    bits: int = 4
    supported_bits: ClassVar[tuple[int, ...]] = (4,)
    block_type: ClassVar[BlockType] = BLOCK_TYPES["q4_0"]


@dataclass
class Q4_1Config(GGUFConfig):
    bits: int = 4
    supported_bits: ClassVar[tuple[int, ...]] = (4,)
    block_type: ClassVar[BlockType] = BLOCK_TYPES["q4_1"]


@dataclass
class Q5_0Config(GGUFConfig):
    bits: int = 5
    supported_bits: ClassVar[tuple[int, ...]] = (5,)
    block_type: ClassVar[BlockType] = BLOCK_TYPES["q5_0"]


@dataclass
class Q5_1Config(GGUFConfig):
    bits: int = 5
    supported_bits: ClassVar[tuple[int, ...]] = (5,)
    block_type: ClassVar[BlockType] = BLOCK_TYPES["q5_1"]


@dataclass
class Q8_0Config(GGUFConfig):
    bits: int = 8
    supported_bits: ClassVar[tuple[int, ...]] = (8,)
    block_type: ClassVar[BlockType] = BLOCK_TYPES["q8_0"]


@register("gguf_q4_0")
class GGUFQ4_0(GGUFBaseline):
    config_class = Q4_0Config


@register("gguf_q4_1")
class GGUFQ4_1(GGUFBaseline):
    config_class = Q4_1Config


@register("gguf_q5_0")
class GGUFQ5_0(GGUFBaseline):
    config_class = Q5_0Config


@register("gguf_q5_1")
class GGUFQ5_1(GGUFBaseline):
    config_class = Q5_1Config


@register("gguf_q8_0")
class GGUFQ8_0(GGUFBaseline):
    config_class = Q8_0Config
