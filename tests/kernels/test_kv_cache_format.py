"""The KV-cache format (kernels/kv_cache.py): round-trip error bounds per granularity, byte counts of
the packed storage, the residual's flushing, and the refusals."""

import pytest
import torch

from quantlab.kernels.kv_cache import KVQuantizer, QuantizedKV, fake_quantize_states, quantize_states
from quantlab.kernels.packing import packed_words

torch.manual_seed(0)
STATES = torch.randn(2, 3, 40, 16) * torch.linspace(0.2, 3.0, 16)  # channels of different scales, as keys have


def _group_view(x: torch.Tensor, quantizer: KVQuantizer, per_channel: bool) -> torch.Tensor:
    """[..., groups, members]: the values each (scale, minimum) covers, laid out for a reduction."""
    b, h, t, d = x.shape
    if per_channel:
        return x.permute(0, 1, 3, 2)  # [b, h, d, t]: one range per channel over the tokens
    group = d if quantizer.group_size == -1 else quantizer.group_size
    return x.reshape(b, h, t, d // group, group)


@pytest.mark.parametrize(
    ("quantizer", "per_channel"),
    [
        (KVQuantizer(8), False),
        (KVQuantizer(4, group_size=8), False),
        (KVQuantizer(2, group_size=4), False),
        (KVQuantizer(4, sym=True), False),
        (KVQuantizer(3, sym=True, group_size=8), False),
        (KVQuantizer(4, "per_channel", residual=40), True),
        (KVQuantizer(2, "per_channel", residual=40), True),
    ],
    ids=["int8-token", "int4-g8", "int2-g4", "int4-sym", "int3-sym-g8", "int4-channel", "int2-channel"],
)
def test_round_trip_error_is_within_half_a_step_of_each_group(quantizer, per_channel):
    out = fake_quantize_states(STATES, quantizer, per_channel)
    error = _group_view((out - STATES).abs(), quantizer, per_channel)
    values = _group_view(STATES, quantizer, per_channel)
    lo, hi = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
    if quantizer.sym:
        step = torch.maximum(lo.abs(), hi.abs()) / (2 ** (quantizer.bits - 1) - 1)
    else:
        step = (hi - lo) / (2**quantizer.bits - 1)
    # half a step, plus the fp16 rounding of the stored scale (times up to 2^b steps) and minimum
    slack = (2**quantizer.bits * step + torch.maximum(lo.abs(), hi.abs())) * 2**-10
    assert bool((error <= step / 2 + slack).all())
    assert bool((error > step / 4).any())  # it did quantize: the bound is not vacuous


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    """KIVI's reason for per-channel keys: a few channels sit at large magnitudes in every token, which
    stretches each token's range; per channel, that offset costs nothing."""
    keys = torch.randn(1, 2, 64, 16)
    keys[..., 3] += 20
    token = fake_quantize_states(keys, KVQuantizer(2))
    channel = fake_quantize_states(keys, KVQuantizer(2, "per_channel", residual=64), per_channel=True)
    assert (channel - keys).pow(2).mean() < 0.5 * (token - keys).pow(2).mean()


def test_values_on_the_grid_come_back_exactly():
    # asym 2-bit, one token of one head: lo -1, hi 2 -> scale 1, minimum -1; codes 0..3
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, 2.0, -1.0, 0.0, 1.0]).view(1, 1, 1, 8)
    stored = quantize_states(x, KVQuantizer(2))
    assert torch.equal(stored.dequantize(), x)
    assert stored.scale.item() == 1.0 and stored.minimum.item() == -1.0
    # the codes themselves, LSB first in one int32 word: 0,1,2,3,3,0,1,2 at 2 bits each
    expected = sum(code << (2 * i) for i, code in enumerate([0, 1, 2, 3, 3, 0, 1, 2]))
    assert stored.codes.flatten().tolist() == [expected]


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(8, -1, False), (4, 8, False), (2, 4, True), (3, -1, False)])
def test_stored_bytes_are_the_packed_codes_and_the_fp16_parameters(bits, group_size, sym):
    b, h, t, d = 2, 3, 10, 16
    stored = quantize_states(torch.randn(b, h, t, d), KVQuantizer(bits, sym=sym, group_size=group_size))
    groups = 1 if group_size == -1 else d // group_size
    words = b * h * t * packed_words(d, bits)
    params = b * h * t * groups * (1 if sym else 2)  # scale (+ minimum), fp16 each
    assert stored.codes.dtype == torch.int32 and stored.codes.shape[-1] == packed_words(d, bits)
    assert stored.nbytes == 4 * words + 2 * params
    # 3 bits: 48 bits of codes per head row take two words, 16 bits of padding
    if bits == 3:
        assert stored.codes.shape[-1] == 2


def test_residual_holds_the_recent_tokens_until_a_block_fills():
    quantizer = KVQuantizer(4, "per_channel", residual=8)
    cache = QuantizedKV(quantizer)
    keys, values = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    cache.append(keys[:, :, :5], values[:, :, :5])
    assert (len(cache.blocks), cache.residual_tokens, cache.tokens) == (0, 5, 5)
    cache.append(keys[:, :, 5:20], values[:, :, 5:20])  # 20 waiting: two blocks of 8 leave, 4 stay
    assert (len(cache.blocks), cache.residual_tokens, cache.tokens) == (2, 4, 20)
    cache.append(keys[:, :, 20:], values[:, :, 20:])
    assert (len(cache.blocks), cache.residual_tokens, cache.tokens) == (3, 6, 30)
    out_keys, out_values = cache.states(torch.float32)
    # each block of 8 keys quantized on its own per-channel ranges; the values per token; residual exact
    for i in range(3):
        block = slice(8 * i, 8 * i + 8)
        assert torch.equal(out_keys[:, :, block], fake_quantize_states(keys[:, :, block], quantizer, True))
        assert torch.equal(out_values[:, :, block], fake_quantize_states(values[:, :, block], quantizer))
    assert torch.equal(out_keys[:, :, 24:], keys[:, :, 24:]) and torch.equal(out_values[:, :, 24:], values[:, :, 24:])
    # what is read back is the stored codes dequantized (kept from the write, not recomputed per read)
    stored = torch.cat([k.dequantize() for k, _ in cache.blocks] + [cache.residual_keys], dim=2)
    assert torch.equal(out_keys, stored)
    residual_bytes = 2 * 1 * 2 * 6 * 16 * 4  # keys and values, 6 tokens in fp32; the read-back copy is not counted
    assert cache.nbytes == sum(k.nbytes + v.nbytes for k, v in cache.blocks) + residual_bytes


def test_kivi_key_groups_split_each_block_into_token_groups():
    quantizer = KVQuantizer(2, "per_channel", group_size=4, residual=8)
    cache = QuantizedKV(quantizer)
    keys, values = torch.randn(1, 2, 19, 16), torch.randn(1, 2, 19, 16)
    cache.append(keys, values)  # two blocks of 8 leave (four key groups of 4 tokens), 3 stay
    assert [k.tokens for k, _ in cache.blocks] == [4, 4, 4, 4] and cache.residual_tokens == 3
    out_keys, out_values = cache.states(torch.float32)
    for i in range(4):
        group = slice(4 * i, 4 * i + 4)
        assert torch.equal(out_keys[:, :, group], fake_quantize_states(keys[:, :, group], quantizer, True))
    # values per token in groups of 4 channels
    assert torch.equal(out_values[:, :, :16], fake_quantize_states(values[:, :, :16], quantizer))
    assert cache.blocks[0][1].scale.shape == (1, 2, 4, 4, 1)


def test_per_token_without_residual_quantizes_every_write_and_off_keeps_it():
    keys = torch.randn(1, 2, 12, 16)
    cache = QuantizedKV(KVQuantizer(8))
    cache.append(keys[:, :, :7], keys[:, :, :7])
    cache.append(keys[:, :, 7:], keys[:, :, 7:])
    assert cache.residual_tokens == 0 and len(cache.blocks) == 2
    assert torch.equal(cache.states(torch.float32)[0], fake_quantize_states(keys, KVQuantizer(8)))  # per token
    off = QuantizedKV(KVQuantizer())
    off.append(keys.half(), keys.half())
    assert not off.blocks and off.nbytes == 2 * keys.numel() * 2 and torch.equal(off.states(torch.float16)[0], keys.half())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "kv.bits"),
        ({"bits": 12}, "kv.bits"),
        ({"bits": 4, "granularity": "per_head"}, "kv.granularity"),
        ({"bits": 4, "group_size": 0}, "kv.group_size"),
        ({"bits": 4, "granularity": "per_channel"}, "kv.residual"),
        ({"bits": 4, "residual": -1}, "kv.residual"),
        ({"bits": 2, "granularity": "per_channel", "group_size": 48, "residual": 128}, "divide kv.residual"),
    ],
)
def test_bad_quantizers_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVQuantizer(**kwargs)


def test_a_group_size_that_does_not_tile_the_head_is_refused():
    with pytest.raises(ValueError, match="does not divide the model's head_dim=16"):
        quantize_states(torch.randn(1, 1, 2, 16), KVQuantizer(4, group_size=6))
