"""llama.cpp's block quantizers (methods/gguf.py) against gguf-py's numpy port of ggml's reference,
byte for byte: gguf-py is the oracle, its bytes decoded field by field (experiments/export/readers.py)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from quantlab.experiments.export.readers import decode_gguf_blocks as decode
from quantlab.methods.base import ConfigError
from quantlab.methods.gguf import BLOCK_TYPES, quantize_blocks, quantize_weight

ORACLE = {key: getattr(GGMLQuantizationType, t.name) for key, t in BLOCK_TYPES.items()}


def weights(seed: int, rows: int = 24, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = 0.0123  # a constant block
    w[2, :32] = torch.tensor([0.5, -0.5] * 16)  # ties of the largest magnitude: the first one wins
    w[3, 32:64] = torch.arange(32) / 31 - 0.5  # exact halves after scaling
    w[4, :32] *= 1e-6  # tiny: d rounds to an fp16 subnormal
    w[5, :] = w[5, :].abs()  # all positive
    w[6, :64] = torch.round(w[6, :64] * 64) / 64  # values on a coarse dyadic grid
    return w


@pytest.mark.parametrize("key", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_codes_and_scales_are_ggmls_bit_for_bit(key, seed):
    block_type = BLOCK_TYPES[key]
    w = weights(seed)
    ref = decode(quants.quantize(w.numpy(), ORACLE[key]).reshape(-1, quants.GGML_QUANT_SIZES[ORACLE[key]][1]), block_type.name)
    q, d, lo = quantize_blocks(w.reshape(-1, 32), block_type)
    assert np.array_equal(q.numpy(), ref["q"])
    assert np.array_equal(d.to(torch.float16).numpy().view(np.uint16), ref["d"].view(np.uint16))
    if ref["m"] is not None:
        assert np.array_equal(lo.to(torch.float16).numpy().view(np.uint16), ref["m"].view(np.uint16))


@pytest.mark.parametrize("key", sorted(BLOCK_TYPES))
def test_the_uniform_weight_is_ggmls_dequantization(key):
    block_type = BLOCK_TYPES[key]
    w = weights(7)
    fmt = quantize_weight(w, block_type)
    ref = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), ORACLE[key]), ORACLE[key]))
    ours = fmt.dequantize()
    if block_type.symmetric:  # d16 * (q - h): exact products
        assert torch.equal(ours, ref)
    else:  # d16 * (q - (-m16 / d16)) against d16 * q + m16: float32 rounding only
        assert (ours - ref).abs().max() <= 4 * torch.finfo(torch.float32).eps * ref.abs().max()
    # the stored (fp16) weight is the same grid: the saved model is ggml's
    stored = fmt.rounded_to_storage()
    assert torch.equal(stored.codes, fmt.codes)
    assert torch.equal(stored.scales.float(), fmt.scales)


@pytest.mark.parametrize(("key", "bits_per_weight"), [("q4_0", 4.5), ("q4_1", 5.0), ("q5_0", 5.5), ("q5_1", 6.0), ("q8_0", 8.5)])
def test_exact_bits_are_ggmls_sizes(key, bits_per_weight):
    fmt = quantize_weight(weights(3), BLOCK_TYPES[key])
    assert fmt.bits_per_weight() == bits_per_weight
    block_size, type_size = quants.GGML_QUANT_SIZES[ORACLE[key]]
    assert bits_per_weight == type_size * 8 / block_size


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_weight(torch.randn(4, 48), BLOCK_TYPES["q4_0"])


def test_the_block_type_fixes_bits_and_group_size():
    from quantlab.methods.gguf import Q4_1Config

    Q4_1Config().validate("gguf_q4_1")
    with pytest.raises(ConfigError, match="bits=3"):
        Q4_1Config(bits=3).validate("gguf_q4_1")
    with pytest.raises(ConfigError, match="group_size=128"):
        Q4_1Config(group_size=128).validate("gguf_q4_1")
