"""The random window draws of the GPTQ reference (`datautils.py`), call for call.

Both functions take a `random.Random` and make exactly the `randint` calls the reference makes
on the global `random` after `random.seed(seed)`, in the same order, so the windows are the
reference's windows for the same text and tokenizer. A private generator (rather than
`random.seed`) leaves the caller's global random state alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sources import TextTooShort
from .tokenization import encode


def draw_stream_windows(
    ids: torch.Tensor, rng: random.Random, count: int, seqlen: int, *, dataset: str
) -> list[torch.Tensor]:
    """`count` windows of `seqlen` tokens from one token stream (GPTQ get_wikitext2/get_ptb).

    The start is `randint(0, n - seqlen - 1)`: the reference never picks the last possible
    start (n - seqlen), and it needs strictly more than `seqlen` tokens.
    """
    n = ids.numel()
    if n <= seqlen:
        raise TextTooShort(
            f"{dataset}: calibration needs more than seqlen={seqlen} tokens of text, "
            f"but its joined text has only {n} tokens"
        )
    windows = []
    for _ in range(count):
        start = rng.randint(0, n - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return windows


@dataclass(frozen=True)
class DocumentDraws:
    windows: list[torch.Tensor]
    first_doc_ids: torch.Tensor  # the first accepted document, whole (to see whether it starts with BOS)
    # Documents of exactly `seqlen` tokens that were accepted (only when accept_equal): see below.
    exact_length_docs: int


def draw_document_windows(
    docs: Sequence[str],
    tokenizer,
    rng: random.Random,
    count: int,
    seqlen: int,
    *,
    accept_equal: bool,
    dataset: str,
) -> DocumentDraws:
    """`count` windows, each from a random document long enough (GPTQ get_c4).

    For each window: draw `i = randint(0, len(docs) - 1)` until document i is long enough, then
    `start = randint(0, n - seqlen - 1)`. "Long enough" is `n > seqlen` for calibration
    (`accept_equal=False`, GPTQ's train loop) and `n >= seqlen` for evaluation
    (`accept_equal=True`, GPTQ's validation loop).

    Reference quirk: with `>=`, a document of exactly `seqlen` tokens makes the reference call
    `randint(0, -1)` and crash. Here such a document is used whole, without a start draw (the
    fix later GPTQ-derived loaders adopted). Whenever the reference completes, it never met
    such a document, so the windows are identical; the count is returned so a protocol can
    record that it went past the point where the reference would have stopped.
    """
    if not docs:
        raise ValueError(f"{dataset}: no documents to sample from")
    accepted: dict[int, torch.Tensor] = {}  # accepted documents are tokenized once
    rejected: set[int] = set()  # only the fact is kept: a shard can hold 100k+ documents
    longest = 0
    exact_length_docs = 0
    first_doc_ids: torch.Tensor | None = None
    windows = []
    for _ in range(count):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i in rejected:
                continue
            ids = accepted.get(i)
            if ids is None:
                ids = encode(tokenizer, docs[i])
                longest = max(longest, ids.numel())
                if ids.numel() > seqlen or (accept_equal and ids.numel() == seqlen):
                    accepted[i] = ids
                else:
                    rejected.add(i)
                    if len(rejected) == len(docs):
                        needed = ">=" if accept_equal else ">"
                        raise TextTooShort(
                            f"{dataset}: no document has {needed} seqlen={seqlen} tokens "
                            f"(longest of all {len(docs)} documents: {longest} tokens)"
                        )
                    continue
            break
        if first_doc_ids is None:
            first_doc_ids = ids
        if ids.numel() == seqlen:
            exact_length_docs += 1
            windows.append(ids)
        else:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start : start + seqlen])
    if first_doc_ids is None:  # count == 0
        first_doc_ids = torch.empty(0, dtype=torch.long)
    return DocumentDraws(windows, first_doc_ids, exact_length_docs)
