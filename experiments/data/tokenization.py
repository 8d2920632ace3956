"""The three things the data protocols need from a tokenizer, for any HF-like callable.

A tokenizer here is anything with `tokenizer(text, return_tensors="pt")` returning an object
with `input_ids` of shape [1, n] (a transformers BatchEncoding, or a test fake).
"""

from __future__ import annotations

import torch


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D int64 tensor, exactly as `tokenizer(text)` returns them
    (special tokens such as a BOS included: the GPTQ reference keeps them)."""
    encoding = tokenizer(text, return_tensors="pt")
    ids = getattr(encoding, "input_ids", None)
    if ids is None:
        ids = encoding["input_ids"]
    ids = torch.as_tensor(ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"tokenizer returned a batch of {ids.shape[0]} sequences for one text")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"tokenizer returned input_ids of shape {tuple(ids.shape)}, expected [1, n]")
    return ids.to(torch.long)


def tokenizer_name(tokenizer) -> str:
    """What the protocol records as the tokenizer (its hub id or local folder when it has one)."""
    return str(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def starts_with_bos(tokenizer, ids: torch.Tensor) -> bool:
    """Whether `ids` (one tokenized text) begins with the tokenizer's BOS token.

    Recorded because it changes perplexity: a window that starts with BOS scores its first
    real token with context, and LLaMA-style tokenizers add one while GPT-2-style ones do not.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id is not None and ids.numel() > 0 and int(ids[0]) == int(bos_id)
