"""KV-cache quantization as transformers sees it: a `Cache` whose layers store keys and values in
the format of kernels/kv_cache.py, quantized when written (README, "KV-cache quantization").

`QuantizedKVLayer.update` is called by every attention layer of the llama and OPT families with
the new keys / values of the tokens being fed [b, kv_heads, t, head_dim]. It returns, for
attention, the earlier tokens as stored (dequantized; the residual's tokens as written) followed
by the new tokens as computed, then stores the new ones. So, as in a serving engine's chunked
prefill, a chunk attends to its own fresh states and to the quantized states of every earlier
chunk; decoding is the chunk length 1.

`kv_shape` reads (layers, kv_heads, head_dim) from a model config; `check_kv_model` refuses a
model this cache cannot serve (a sliding-window or non-attention layer, a head_dim the group size
does not tile); `cache_memory` measures what the cache holds at a given context length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from quantlab.kernels.kv_cache import KVQuantizer, QuantizedKV


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache in the quantized format (kernels/kv_cache.py QuantizedKV)."""

    is_croppable = False  # stored blocks cannot be cut back token by token

    def __init__(self, quantizer: KVQuantizer) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.store = QuantizedKV(quantizer)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Earlier tokens as stored, then the new ones as computed; the new ones are then stored."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        earlier = self.store.states(key_states.dtype)
        self.store.append(key_states, value_states)
        if earlier is None:
            return key_states, value_states
        return torch.cat([earlier[0], key_states], dim=2), torch.cat([earlier[1], value_states], dim=2)

    def get_seq_length(self) -> int:
        return self.store.tokens

    def reset(self) -> None:
        super().reset()
        self.store = QuantizedKV(self.quantizer)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the quantized KV cache serves perplexity (no beam search)")


class QuantizedKVCache(Cache):
    """A cache of `num_layers` QuantizedKVLayer, built for one forward pass over one batch."""

    def __init__(self, quantizer: KVQuantizer, num_layers: int) -> None:
        super().__init__(layers=[QuantizedKVLayer(quantizer) for _ in range(num_layers)])

    @property
    def nbytes(self) -> int:
        return sum(layer.store.nbytes for layer in self.layers)


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    def elements(self, tokens: int) -> int:
        """Cached numbers for `tokens` tokens of one sequence: keys and values, every layer and head."""
        return 2 * self.layers * self.kv_heads * tokens * self.head_dim


def kv_shape(config: Any) -> KVShape:
    """(layers, kv_heads, head_dim) of a decoder config (GQA heads where the config has them)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVShape(config.num_hidden_layers, kv_heads, head_dim)


def _layer_types(config: Any) -> list[str]:
    """transformers' own reading of the attention kind of every layer (full, sliding, ...)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # older transformers: the config's own field, else the sliding window
        types = getattr(config, "layer_types", None)
        if types is not None:
            return list(types)
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        return [kind] * config.num_hidden_layers
    return list(get_layer_types_and_kwargs(config)[0])


def check_kv_model(config: Any, quantizer: KVQuantizer, name: str) -> None:
    """Raise ValueError naming the problem when this cache cannot serve the model `config`."""
    other = sorted(set(_layer_types(config)) - {"full_attention"})
    if other:
        raise ValueError(
            f"kv quantization keeps every token of full-attention layers; model {name!r} has {', '.join(other)} "
            "layers, which this cache does not implement: use kv=none for this model"
        )
    quantizer.check_head_dim(kv_shape(config).head_dim)


def cache_kwarg(backbone: torch.nn.Module) -> str:
    """The backbone's keyword for a cache object: `cache` (transformers 5.x) or `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@functools.lru_cache(maxsize=16)
def cache_memory(shape: KVShape, quantizer: KVQuantizer, tokens: int, chunk: int) -> dict[str, Any]:
    """What the cache stores for one sequence of `tokens` tokens of a model of `shape`, written
    `chunk` tokens at a time as the evaluation writes them: random fp16 states go through each
    layer's store, and the bytes are read from the stored tensors (codes, scales, minima, the
    residual), beside the same states kept as fp16. One layer at a time, so 8k tokens of a 7B
    model fit. `bits_per_element` counts every stored byte over the cached numbers."""
    generator = torch.Generator().manual_seed(0)
    stored = fp16 = residual_tokens = 0
    for _ in range(shape.layers):
        size = (1, shape.kv_heads, tokens, shape.head_dim)
        keys, values = torch.randn(size, generator=generator).half(), torch.randn(size, generator=generator).half()
        layer, plain = QuantizedKV(quantizer), QuantizedKV(KVQuantizer())
        for start in range(0, tokens, chunk):
            layer.append(keys[:, :, start : start + chunk], values[:, :, start : start + chunk])
        plain.append(keys, values)  # kept as written: fp16
        stored, fp16 = stored + layer.nbytes, fp16 + plain.nbytes
        residual_tokens = layer.residual_tokens
    return {
        "tokens": tokens, "bytes": stored, "fp16_bytes": fp16, "residual_tokens": residual_tokens,
        "bits_per_element": 8 * stored / shape.elements(tokens),
    }
