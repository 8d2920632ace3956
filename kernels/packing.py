"""Bit-packing of small unsigned integers (codes, zero-points, codebook indices) into int32 words.

Layout. Along the last dimension, each row of n values of b bits (1 <= b <= 16) is one LSB-first
bitstream: value i occupies stream bits [i*b, (i+1)*b), least significant bit first, and stream
bit t is bit (t % 32) of word (t // 32), bit 0 being the least significant bit of the word. The
stream is zero-padded to whole words, so a row takes `packed_words(n, b) = ceil(n*b / 32)` words
and `packed_words(n, b) * 32 - n*b` padding bits. A word is a torch.int32 holding the unsigned
32-bit pattern (bit 31 is the sign bit of the int32). Leading dimensions are kept: codes
[..., n] pack to words [..., ceil(n*b / 32)]; rows never share a word.

Worked example, b = 3. Codes [1, 2, 3] give the stream 1 | 2 << 3 | 3 << 6 = 0b011_010_001, one
word 0xD1 = 209. With 32 / 3 not an integer, values straddle words: 11 codes take 33 bits, two
words; code 10 sits at stream bits 30..32, so its two low bits are bits 30, 31 of word 0 and its
high bit is bit 0 of word 1. Codes [0]*10 + [5] (5 = 0b101) pack to
word 0 = 1 << 30 = 0x40000000 and word 1 = 0x00000001 (31 padding bits).
With b in {1, 2, 4, 8} (and 16) no value straddles: word k holds values k*32/b .. (k+1)*32/b - 1,
value j of the word at bits [j*b, (j+1)*b), the usual GPTQ/AWQ-style "first value in the low bits"
order (without their interleavings, which belong to the fast kernels, not to storage).

Everything is vectorized torch (one scatter/gather per word-position pattern, no loop over values)
and runs on any device. Unpacked values come back as torch.uint8 for b <= 8, torch.int32 above.
"""

from __future__ import annotations

import math

import torch

MAX_BITS = 16
_WORD = 32
_MASK32 = (1 << 32) - 1


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding n values of `bits` bits: ceil(n * bits / 32)."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return -(-n * bits // _WORD)


def padding_bits(n: int, bits: int) -> int:
    """Zero bits after the last value of a row: packed_words(n, bits) * 32 - n * bits."""
    return packed_words(n, bits) * _WORD - n * bits


def _positions(n: int, bits: int, device: torch.device):
    """Per value: its word, its shift in that word, and the values that straddle into the next word.
    Computed on the CPU (they depend on (n, bits) only) and moved once."""
    offset = torch.arange(n, dtype=torch.int64) * bits
    word, shift = offset // _WORD, offset % _WORD
    straddle = torch.nonzero(shift + bits > _WORD).flatten()
    return word.to(device), shift.to(device), straddle.to(device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] in [0, 2^bits - 1] into int32 words [..., packed_words(n, bits)]
    (layout in the module docstring)."""
    _check_bits(bits)
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
    maxq = (1 << bits) - 1
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > maxq:
            raise ValueError(f"{bits}-bit codes must lie in [0, {maxq}], got values in [{lo}, {hi}]")
    *lead, n = codes.shape
    rows, n_words = math.prod(lead), packed_words(n, bits)
    flat = codes.reshape(rows, n).to(torch.int64)
    words = torch.zeros(rows, n_words, dtype=torch.int64, device=codes.device)
    if n and rows:
        word, shift, straddle = _positions(n, bits, codes.device)
        # The bits of different values never overlap, so adding them is OR-ing them.
        words.scatter_add_(1, word.expand(rows, n), (flat << shift) & _MASK32)
        if straddle.numel():
            high = flat[:, straddle] >> (_WORD - shift[straddle])
            words.scatter_add_(1, (word[straddle] + 1).expand(rows, -1), high)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(*lead, n_words)


def unpack_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The n codes of each row of int32 `words` [..., packed_words(n, bits)]: [..., n], uint8 for
    bits <= 8, int32 above. Refuses a wrong word count and set padding bits (a wrong n or bits)."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be torch.int32, got {words.dtype}")
    *lead, n_words = words.shape
    if n_words != packed_words(n, bits):
        raise ValueError(
            f"{n} values of {bits} bits take {packed_words(n, bits)} words per row, got {n_words}"
        )
    out_dtype = torch.uint8 if bits <= 8 else torch.int32
    rows = math.prod(lead)
    flat = words.reshape(rows, n_words).to(torch.int64) & _MASK32
    if not n or not rows:
        return torch.zeros(*lead, n, dtype=out_dtype, device=words.device)
    used = n * bits % _WORD
    if used and bool((flat[:, -1] >> used).any()):
        raise ValueError(f"padding bits are set: these words do not hold {n} values of {bits} bits")
    word, shift, straddle = _positions(n, bits, words.device)
    values = flat.gather(1, word.expand(rows, n)) >> shift
    if straddle.numel():
        high = flat.gather(1, (word[straddle] + 1).expand(rows, -1)) << (_WORD - shift[straddle])
        values[:, straddle] |= high
    values &= (1 << bits) - 1
    return values.to(out_dtype).reshape(*lead, n)
