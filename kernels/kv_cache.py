"""KV-cache format: keys and values stored as packed integer codes with fp16 scales (and minima),
quantized when they are written (README, "KV-cache quantization").

States have the attention layout [batch, kv_heads, tokens, head_dim]. `KVQuantizer` is the config;
`quantize_states` turns a block of states into `QuantizedStates` (codes packed along head_dim into
int32 words by kernels/packing.py, LSB first; 8-bit codes four to a word, the bytes of uint8);
`QuantizedKV` is one attention layer's cache: the quantized blocks plus a full-precision residual.
Every byte count is read from the stored tensors (`nbytes`), never computed from a formula.

Grids (kernels/grid.py, shared with weights and activations):
- asym (`sym=False`, KIVI's): the raw range, `Grid(bits, float_zero=True)`: scale = (hi - lo) / (2^b - 1),
  codes round((x - lo) / scale) in [0, 2^b - 1]; stored: scale and lo (as fp16; lo is the float zero
  -zero * scale, kept as the minimum because -lo / scale overflows fp16 for a narrow range far from 0).
- sym: the absmax grid `Grid(bits, sym=True, zero_in_range=False)`: scale = max|x| / (2^(b-1) - 1),
  levels [-2^(b-1), 2^(b-1) - 1]; stored: scale only.
Codes are computed against the fp16-rounded parameters, so what is stored is what dequantizes.

Granularity (what one (scale, minimum) covers):
- `per_token`: keys and values alike, one range per token per head over head_dim, or over each
  group of `group_size` consecutive channels of the head (group_size must divide head_dim).
- `per_channel` (KIVI): keys get one range per channel per head over each group of `group_size`
  consecutive tokens (-1: over the whole block of `residual` tokens); values stay per token, in
  groups of `group_size` channels, as KIVI's (one group_size for both axes, as its code has it).
  Tokens wait in the full-precision residual until a whole block of `residual` tokens is there.
`residual` (R): the most recent tokens not yet quantized are held in full precision (counted in
the bytes); whenever R or more are waiting, the oldest whole multiple of R is quantized (per_token
with R = 0 quantizes every write at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from quantlab.kernels import grid as grids
from quantlab.kernels.packing import pack_codes, unpack_codes

OFF_BITS = 16
KV_BITS = (2, 3, 4, 5, 6, 7, 8)
GRANULARITIES = ("per_token", "per_channel")
PARAM_DTYPE = torch.float16  # scales and minima as stored
Granularity = Literal["per_token", "per_channel"]


@dataclass(frozen=True)
class KVQuantizer:
    bits: int = OFF_BITS  # 16: off (states kept as written)
    granularity: Granularity = "per_token"
    sym: bool = False
    group_size: int = -1  # channels per per-token range (-1: the whole head); per_channel keys: tokens per range
    residual: int = 0  # tokens held in full precision until a block of this many fills (per_channel: > 0)

    def __post_init__(self) -> None:
        if self.bits != OFF_BITS and self.bits not in KV_BITS:
            raise ValueError(f"kv.bits must be 16 (off) or one of {', '.join(map(str, KV_BITS))}, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"kv.granularity must be per_token or per_channel, got {self.granularity!r}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"kv.group_size={self.group_size} must be -1 (the whole head) or a positive divisor "
                             "of head_dim")
        if self.residual < 0:
            raise ValueError(f"kv.residual={self.residual} must be 0 or more")
        if self.enabled and self.granularity == "per_channel" and self.residual < 2:
            raise ValueError("kv.granularity=per_channel takes each key channel's range over a block of kv.residual "
                             f"tokens, so kv.residual must be 2 or more (KIVI: 128), got {self.residual}")
        if self.enabled and self.granularity == "per_channel" and self.group_size != -1 and (
            self.group_size < 2 or self.residual % self.group_size
        ):
            raise ValueError(f"kv.granularity=per_channel ranges keys over groups of kv.group_size tokens inside each "
                             f"block of kv.residual={self.residual}: kv.group_size={self.group_size} must be 2 or more "
                             "and divide kv.residual (KIVI: 32 and 128), or -1 (the whole block)")

    @property
    def enabled(self) -> bool:
        return self.bits != OFF_BITS

    def grid(self) -> grids.Grid:
        if self.sym:
            return grids.Grid(self.bits, sym=True, zero_in_range=False)
        return grids.Grid(self.bits, sym=False, zero_in_range=False, float_zero=True)

    def check_head_dim(self, head_dim: int) -> None:
        """The group size must tile a head: raises ValueError naming both otherwise."""
        if self.group_size != -1 and head_dim % self.group_size:
            raise ValueError(f"kv.group_size={self.group_size} does not divide the model's head_dim={head_dim}: "
                             f"use a divisor of {head_dim} or -1 (the whole head)")


@dataclass
class QuantizedStates:
    """A block of states [b, h, t, d] as stored: `codes` int32 words [b, h, t, words(d)], `scale`
    and `minimum` (None when sym) fp16, shaped [b, h, t, d / g, 1] per token or [b, h, 1, d] per
    channel, so that they broadcast against the states viewed the same way."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None
    grid: grids.Grid
    head_dim: int
    per_channel: bool

    @property
    def tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def nbytes(self) -> int:
        stored = [self.codes, self.scale] + ([self.minimum] if self.minimum is not None else [])
        return sum(t.numel() * t.element_size() for t in stored)

    def _zero(self, scale: torch.Tensor) -> torch.Tensor:
        if self.minimum is None:
            return torch.full_like(scale, 2 ** (self.grid.bits - 1))
        return -self.minimum.float() / scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_codes(self.codes, self.grid.bits, self.head_dim).float()
        b, h, t, d = codes.shape
        scale = self.scale.float()
        view = codes if self.per_channel else codes.view(b, h, t, scale.shape[3], -1)
        return grids.dequantize(view, scale, self._zero(scale)).reshape(b, h, t, d).to(dtype)


def quantize_states(states: torch.Tensor, quantizer: KVQuantizer, per_channel: bool = False) -> QuantizedStates:
    """states [b, h, t, d] -> QuantizedStates: one range per (token, head, channel group), or with
    `per_channel` one per (head, channel) over all t tokens of the block."""
    if states.dim() != 4:
        raise ValueError(f"expected states [batch, heads, tokens, head_dim], got {tuple(states.shape)}")
    b, h, t, d = states.shape
    quantizer.check_head_dim(d)
    grid = quantizer.grid()
    x = states.float()
    if per_channel:
        view, lo, hi = x, x.amin(dim=2, keepdim=True), x.amax(dim=2, keepdim=True)
    else:
        group = d if quantizer.group_size == -1 else quantizer.group_size
        view = x.reshape(b, h, t, d // group, group)
        lo, hi = view.amin(dim=-1, keepdim=True), view.amax(dim=-1, keepdim=True)
    scale = grids.range_params(lo, hi, grid)[0].to(PARAM_DTYPE)
    minimum = None if grid.sym else lo.to(PARAM_DTYPE)  # the float zero, kept as -zero * scale = lo
    stored = QuantizedStates(torch.empty(0), scale, minimum, grid, d, per_channel)
    scale32 = scale.float()
    codes = grids.quantize(view, scale32, stored._zero(scale32), grid.maxq, float_zero=not grid.sym)
    stored.codes = pack_codes(codes.reshape(b, h, t, d).to(torch.uint8), grid.bits)
    return stored


def fake_quantize_states(states: torch.Tensor, quantizer: KVQuantizer, per_channel: bool = False) -> torch.Tensor:
    """What the cache hands attention for `states` once stored: quantize, then dequantize."""
    return quantize_states(states, quantizer, per_channel).dequantize(states.dtype)


class QuantizedKV:
    """One attention layer's cache: quantized blocks of (keys, values) in write order, then the
    full-precision residual of the most recent tokens (module docstring). With the quantizer off
    every state stays in the residual as written.

    Reading back: each block is dequantized once, when it is stored, into `readback` (the blocks'
    states as attention sees them, in the written dtype), so a chunked prefill does not unpack the
    whole cache again for every chunk; dequantizing is deterministic, so this is exactly what
    re-reading the codes would give. `readback` is evaluation scaffolding: `nbytes` leaves it out."""

    def __init__(self, quantizer: KVQuantizer) -> None:
        self.quantizer = quantizer
        self.blocks: list[tuple[QuantizedStates, QuantizedStates]] = []
        self.residual_keys: torch.Tensor | None = None
        self.residual_values: torch.Tensor | None = None
        self.readback: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def tokens(self) -> int:
        held = 0 if self.residual_keys is None else self.residual_keys.shape[2]
        return held + sum(keys.tokens for keys, _ in self.blocks)

    @property
    def residual_tokens(self) -> int:
        return 0 if self.residual_keys is None else self.residual_keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write new states [b, h, t, d]; whole blocks leave the residual quantized."""
        if self.residual_keys is None:
            self.residual_keys, self.residual_values = keys, values
        else:
            self.residual_keys = torch.cat([self.residual_keys, keys], dim=2)
            self.residual_values = torch.cat([self.residual_values, values], dim=2)
        q = self.quantizer
        if not q.enabled:
            return
        waiting = self.residual_keys.shape[2]
        ready = waiting if q.residual == 0 else waiting - waiting % q.residual
        if ready == 0:
            return
        per_channel = q.granularity == "per_channel"
        # per-channel key ranges span one token group (the whole block with group_size -1)
        step = (q.residual if q.group_size == -1 else q.group_size) if per_channel else ready
        new_blocks = []
        for start in range(0, ready, step):
            keys_block = self.residual_keys[:, :, start : start + step]
            values_block = self.residual_values[:, :, start : start + step]
            new_blocks.append((quantize_states(keys_block, q, per_channel), quantize_states(values_block, q)))
        self.blocks.extend(new_blocks)
        dtype = keys.dtype
        read = [torch.cat([b[i].dequantize(dtype) for b in new_blocks], dim=2) for i in (0, 1)]
        if self.readback is not None:
            read = [torch.cat([old, new], dim=2) for old, new in zip(self.readback, read)]
        self.readback = (read[0], read[1])
        # a copy, so the residual does not keep the whole written tensor alive through a view
        self.residual_keys = self.residual_keys[:, :, ready:].clone()
        self.residual_values = self.residual_values[:, :, ready:].clone()

    def states(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) of every token held, dequantized, in dtype; None before the first write."""
        if self.residual_keys is None:
            return None
        if self.readback is None:
            return self.residual_keys.to(dtype), self.residual_values.to(dtype)
        keys = torch.cat([self.readback[0].to(dtype), self.residual_keys.to(dtype)], dim=2)
        return keys, torch.cat([self.readback[1].to(dtype), self.residual_values.to(dtype)], dim=2)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor: codes, scales, minima and the full-precision residual."""
        quantized = sum(k.nbytes + v.nbytes for k, v in self.blocks)
        if self.residual_keys is None:
            return quantized
        residual = (self.residual_keys, self.residual_values)
        return quantized + sum(t.numel() * t.element_size() for t in residual)
