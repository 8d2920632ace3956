"""The quantized KV cache in transformers' models (experiments/models/kv_cache.py) and the chunked
perplexity through it (experiments/evaluation/perplexity.py): what a layer hands attention, that
chunking with the cache off changes nothing, that the cache carries the context, how much a
quantized cache moves the NLL, and the measured memory."""

import pytest
import torch
from transformers import AutoConfig

from quantlab.experiments.evaluation.perplexity import perplexity
from quantlab.experiments.models.kv_cache import (
    KVShape,
    QuantizedKVCache,
    QuantizedKVLayer,
    cache_memory,
    check_kv_model,
    kv_shape,
)
from quantlab.kernels.kv_cache import KVQuantizer, fake_quantize_states
from quantlab.kernels.packing import packed_words
from tests.conftest import _load

WINDOWS = torch.randint(0, 49152, (3, 64), generator=torch.Generator().manual_seed(1))


def test_a_layer_hands_attention_the_stored_earlier_tokens_and_the_fresh_new_ones():
    quantizer = KVQuantizer(4)
    layer = QuantizedKVLayer(quantizer)
    k1, v1, k2, v2 = (torch.randn(2, 2, n, 16) for n in (5, 5, 3, 3))
    keys, values = layer.update(k1, v1)
    assert keys is k1 and values is v1 and layer.get_seq_length() == 5
    keys, values = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([fake_quantize_states(k1, quantizer), k2], dim=2))
    assert torch.equal(values, torch.cat([fake_quantize_states(v1, quantizer), v2], dim=2))
    assert layer.get_seq_length() == 8 and layer.get_mask_sizes(4) == (12, 0)
    cache = QuantizedKVCache(quantizer, 2)
    cache.update(k1, v1, 1)
    assert cache.get_seq_length(1) == 5 and cache.nbytes == cache.layers[1].store.nbytes > 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_chunked_prefill_with_the_cache_off_is_the_plain_forward(name):
    loaded = _load(name)
    model, arch = loaded.model, loaded.architecture
    plain = perplexity(model, arch, WINDOWS, batch_size=2)
    for chunk in (16, 10):  # 10: the last chunk is shorter
        chunked = perplexity(model, arch, WINDOWS, batch_size=2, chunk=chunk)
        assert chunked.window_nll == pytest.approx(plain.window_nll, rel=1e-5, abs=1e-6)
    # both families call the cache's update: a quantized one moves the NLL
    quantized = perplexity(model, arch, WINDOWS, batch_size=2, chunk=16, kv=KVQuantizer(4))
    assert quantized.window_nll != pytest.approx(plain.window_nll, rel=1e-6, abs=1e-7)
    # the cache is what carries the context: chunks fed alone predict worse
    backbone = model.get_submodule(arch.backbone)
    with torch.no_grad():
        alone = torch.cat([backbone(input_ids=WINDOWS[:, s : s + 16]).last_hidden_state for s in range(0, 64, 16)], 1)
        carried = backbone(input_ids=WINDOWS, use_cache=False).last_hidden_state
    assert (alone - carried).abs().max() > 1e-3


def test_a_quantized_cache_moves_the_nll_more_at_fewer_bits():
    loaded = _load("tiny-llama")
    model, arch = loaded.model, loaded.architecture
    plain = torch.tensor(perplexity(model, arch, WINDOWS, batch_size=3).window_nll)

    def moved(quantizer: KVQuantizer) -> float:
        nll = torch.tensor(perplexity(model, arch, WINDOWS, batch_size=3, chunk=16, kv=quantizer).window_nll)
        return float((nll - plain).abs().mean())

    int8, int4, int2 = moved(KVQuantizer(8)), moved(KVQuantizer(4)), moved(KVQuantizer(2))
    kivi2 = moved(KVQuantizer(2, "per_channel", group_size=8, residual=16))
    assert 0 < int8 < int4 < int2
    assert 0 < kivi2 and int8 < 0.05 * int2
    # a residual as long as the window: no token is ever read back quantized, so nothing changes
    assert moved(KVQuantizer(2, "per_channel", residual=64)) < 1e-6


def test_memory_is_read_from_the_stored_tensors():
    shape = KVShape(layers=2, kv_heads=3, head_dim=16)
    fp16 = shape.elements(100) * 2
    int4 = cache_memory(shape, KVQuantizer(4), 100, 32)
    # per token and head: 64 bits of codes (2 words) + fp16 scale and minimum, for keys and values
    per_row = 4 * packed_words(16, 4) + 2 * 2
    assert int4["bytes"] == 2 * 2 * 3 * 100 * per_row and int4["fp16_bytes"] == fp16
    assert int4["bits_per_element"] == pytest.approx(8 * per_row / 16) and int4["residual_tokens"] == 0
    kivi = cache_memory(shape, KVQuantizer(2, "per_channel", group_size=8, residual=32), 100, 32)
    assert kivi["residual_tokens"] == 100 % 32  # the tokens waiting for a block, kept as fp16 and counted
    # per layer and head, 96 tokens quantized: keys 96 rows of 2-bit codes (one word) and per group of
    # 8 tokens 16 channels' fp16 scale and minimum; values 96 rows of codes and 2 channel groups' parameters
    keys = 96 * 4 + (96 // 8) * 16 * 2 * 2
    values = 96 * (4 + 2 * 2 * 2)
    residual = 2 * 4 * 16 * 2  # keys and values of 4 tokens, fp16
    assert kivi["bytes"] == 2 * 3 * (keys + values + residual)
    off = cache_memory(shape, KVQuantizer(), 100, 32)
    assert off["bytes"] == fp16 and off["bits_per_element"] == 16


def test_the_model_shape_and_the_models_a_cache_cannot_serve():
    llama = _load("tiny-llama").model.config
    assert kv_shape(llama) == KVShape(2, 2, 16)
    assert kv_shape(_load("tiny-opt").model.config) == KVShape(2, 4, 16)
    check_kv_model(llama, KVQuantizer(4, group_size=8), "tiny-llama")
    with pytest.raises(ValueError, match="kv.group_size=32 does not divide the model's head_dim=16"):
        check_kv_model(llama, KVQuantizer(2, "per_channel", group_size=32, residual=128), "tiny-llama")
    sliding = AutoConfig.for_model("mistral", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                   sliding_window=32)
    with pytest.raises(ValueError, match="sliding_attention layers.*kv=none"):
        check_kv_model(sliding, KVQuantizer(4), "tiny-mistral")
