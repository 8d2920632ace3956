"""Perplexity on non-overlapping windows, as the references compute it (reference/methods.md §9.1),
with its uncertainty.

Each window is evaluated alone (no carried context); its loss is the mean cross-entropy of
positions 1..L-1 in fp32, and PPL = exp(mean over windows of those means), exactly the GPTQ
formula exp(Σ_w nll_w·L / (n·L)). The uncertainty comes from the spread of the per-window NLLs:
a Student-t interval on the mean NLL, mapped through exp. Per-window NLLs are kept so that two
runs on the same windows can be compared pairwise.

Logits are produced a slice of positions at a time, so a 2048 × 128k-vocabulary window never
materializes in fp32 all at once.

With `chunk` set, each window is fed as a chunked prefill instead of one forward: chunks of `chunk`
tokens in order, a cache carrying the earlier chunks' keys and values (experiments/models/kv_cache.py,
quantized when `kv` is on), so later positions attend to the cache as stored. The hidden states of
the chunks are joined and the NLL is computed from them exactly as for one forward; with the cache
off the two agree up to float rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.experiments.evaluation.statistics import t_quantile_975
from quantlab.experiments.models.adapters import Architecture
from quantlab.kernels.kv_cache import KVQuantizer

LOGIT_SLICE = 512  # positions per lm_head call: bounds the fp32 logits memory
Observer = Callable[[int, int, torch.Tensor], None]  # (first window of the batch, first position, log-probs)


@dataclass
class PerplexityResult:
    value: float
    ci_low: float | None
    ci_high: float | None
    n_windows: int
    n_tokens: int  # predicted tokens: n_windows * (seqlen - 1)
    window_nll: list[float]
    seconds: float
    tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(window_nll: list[float], seqlen: int, seconds: float) -> PerplexityResult:
    n = len(window_nll)
    mean = sum(window_nll) / n
    ci_low = ci_high = None
    if n > 1:
        var = sum((x - mean) ** 2 for x in window_nll) / (n - 1)
        half = t_quantile_975(n - 1) * math.sqrt(var / n)
        ci_low, ci_high = math.exp(mean - half), math.exp(mean + half)
    n_tokens = n * (seqlen - 1)
    return PerplexityResult(
        value=math.exp(mean), ci_low=ci_low, ci_high=ci_high, n_windows=n, n_tokens=n_tokens,
        window_nll=window_nll, seconds=seconds, tokens_per_s=n * seqlen / seconds if seconds > 0 else float("nan"),
    )


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def hidden_states(
    backbone: nn.Module, ids: torch.Tensor, chunk: int | None = None, kv: KVQuantizer | None = None
) -> torch.Tensor:
    """The backbone's last hidden states [b, L, H]: one forward without a cache, or (`chunk`) a
    chunked prefill through a fresh cache in kv's format (off: states kept as written)."""
    if chunk is None:
        return backbone(input_ids=ids, use_cache=False).last_hidden_state
    from quantlab.experiments.models.kv_cache import (  # needs transformers' layered Cache
        QuantizedKVCache,
        cache_kwarg,
    )

    cache = QuantizedKVCache(kv or KVQuantizer(), backbone.config.num_hidden_layers)
    keyword = cache_kwarg(backbone)
    parts = [
        backbone(input_ids=ids[:, start : start + chunk], use_cache=True, **{keyword: cache}).last_hidden_state
        for start in range(0, ids.shape[1], chunk)
    ]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def window_nll(
    model: nn.Module, arch: Architecture, windows: torch.Tensor, observer: Observer | None = None, first_window: int = 0,
    chunk: int | None = None, kv: KVQuantizer | None = None,
) -> torch.Tensor:
    """Mean next-token NLL of each window in the batch [b, L] -> [b], computed in fp32.
    `observer(first_window, start, log_probs)` sees each slice's fp32 log-probabilities [b, s, V]
    (experiments/evaluation/kl.py records or compares distributions there, at no second forward pass).
    `chunk`, `kv`: a chunked prefill through a (quantized) cache (`hidden_states`)."""
    backbone = model.get_submodule(arch.backbone)
    lm_head = model.get_output_embeddings()
    ids = windows.to(input_device(model))
    hidden = hidden_states(backbone, ids, chunk, kv)
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=hidden.device)
    n_positions = ids.shape[1] - 1
    for start in range(0, n_positions, LOGIT_SLICE):
        end = min(start + LOGIT_SLICE, n_positions)
        logits = lm_head(hidden[:, start:end].to(lm_head.weight.device)).float()
        if arch.finish_logits is not None:  # what the model's own head adds (Gemma 2's soft-capping)
            logits = arch.finish_logits(logits)
        targets = ids[:, start + 1 : end + 1].to(logits.device)
        if observer is None:
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        else:  # cross_entropy is nll_loss(log_softmax): the same numbers, the log-probs shared
            log_probs = torch.log_softmax(logits, dim=-1)
            observer(first_window, start, log_probs)
            nll = F.nll_loss(log_probs.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        total += nll.view(ids.shape[0], -1).sum(dim=1).double().to(total.device)
    return (total / n_positions).float()


@torch.no_grad()
def perplexity(
    model: nn.Module, arch: Architecture, windows: torch.Tensor, batch_size: int = 1, progress: bool = False,
    observer: Observer | None = None, chunk: int | None = None, kv: KVQuantizer | None = None,
) -> PerplexityResult:
    from tqdm.auto import tqdm

    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"expected windows [n, seqlen] with n >= 1, got {tuple(windows.shape)}")
    start = time.perf_counter()
    nll: list[float] = []
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        nll.extend(window_nll(model, arch, batch, observer, len(nll), chunk, kv).tolist())
    return summarize(nll, windows.shape[1], time.perf_counter() - start)


def place_for_eval(model: nn.Module, arch: Architecture, device: torch.device) -> None:
    """Put the model on the compute device whole when it fits, else spread it with accelerate's
    device map (GPU first, then CPU), so a model larger than the GPU can still be evaluated."""
    if device.type != "cuda":
        model.to(device)
        return
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _total = torch.cuda.mem_get_info(device)
    if need < 0.85 * free:
        model.to(device)
        return
    from accelerate import dispatch_model, infer_auto_device_map

    block_class = type(arch.block_list(model)[0]).__name__
    device_map = infer_auto_device_map(model, no_split_module_classes=[block_class])
    dispatch_model(model, device_map=device_map)


def release_from_eval(model: nn.Module) -> None:
    """Undo an accelerate dispatch (if any) so the driver can move blocks one at a time again."""
    if getattr(model, "hf_device_map", None) is None:
        return
    from accelerate.hooks import remove_hook_from_submodules

    remove_hook_from_submodules(model)
    model.to("cpu")
    del model.hf_device_map
