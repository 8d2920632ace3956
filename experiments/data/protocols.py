"""Perplexity evaluation text and windows, as in the GPTQ reference (methods.md §9.1).

Each evaluation set becomes a [n, seqlen] tensor of token windows plus a `protocol` dict that
records everything that determined it; a perplexity is only comparable with another whose
protocol matches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .gptq_sampling import draw_document_windows
from .sources import TextTooShort, resolve_rows
from .tokenization import encode, starts_with_bos, tokenizer_name

EVAL_DATASETS = ("wikitext2", "ptb", "ptb-new", "c4", "c4-new", "pydocs")

# GPTQ evaluates C4 on 256 windows: 256 random windows for "c4", the first 256*seqlen tokens
# for "c4-new".
C4_EVAL_WINDOWS = 256
# GPTQ hard-codes random.seed(0) for the C4 validation windows, whatever the calibration seed.
C4_EVAL_SEED = 0


@dataclass(frozen=True)
class StreamText:
    """An evaluation set that is one text: rows joined, tokenized once, cut into windows."""

    source: str  # dataset name in `sources`
    split: str
    join: str
    max_docs: int | None = None  # keep only the first rows (c4-new: the first 1100 documents)
    max_windows: int | None = None  # keep only the first max_windows * seqlen tokens (c4-new)


STREAM_TEXTS: dict[str, StreamText] = {
    "wikitext2": StreamText("wikitext2", "test", "\n\n"),
    # GPTQ's "ptb" is the *validation* split joined with "\n\n"; "ptb-new" (OWQ, SliM-LLM) is the
    # *test* split joined with " ". They give different perplexities: never mix them.
    "ptb": StreamText("ptb", "validation", "\n\n"),
    "ptb-new": StreamText("ptb", "test", " "),
    # With the local C4 sample the validation split has only 1,000 documents, so all of them
    # are used; the protocol records the number actually joined.
    "c4-new": StreamText("c4", "validation", " ", max_docs=1100, max_windows=C4_EVAL_WINDOWS),
    "pydocs": StreamText("pydocs", "test", "\n\n"),
}


@dataclass(frozen=True, eq=False)
class EvalWindows:
    input_ids: torch.Tensor  # int64, [n_windows, seqlen]
    protocol: dict


def _check_sizes(seqlen: int, max_windows: int | None) -> None:
    if seqlen < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be None (all) or >= 1, got {max_windows}")


def _kept(total: int, max_windows: int | None) -> int:
    # max_windows keeps the FIRST windows, so a quick run scores a prefix of the full run.
    return total if max_windows is None else min(max_windows, total)


def _stream_windows(name: str, tokenizer, seqlen: int, max_windows: int | None) -> EvalWindows:
    text = STREAM_TEXTS[name]
    resolved = resolve_rows(text.source, text.split)
    rows = resolved.rows if text.max_docs is None else resolved.rows[: text.max_docs]
    # Tokenized as one string, as the reference does: a window may start mid-sentence and only
    # the first window begins with the tokenizer's BOS (if it adds one).
    ids = encode(tokenizer, text.join.join(rows))
    n_tokens = ids.numel()
    if text.max_windows is not None:
        ids = ids[: text.max_windows * seqlen]
    total = ids.numel() // seqlen  # non-overlapping windows; the tail is dropped
    if total == 0:
        raise TextTooShort(
            f"{name}: only {ids.numel()} tokens available, fewer than seqlen={seqlen}: "
            "not even one evaluation window"
        )
    kept = _kept(total, max_windows)
    protocol = {
        "dataset": name,
        "variant": resolved.variant,
        "split": text.split,
        "join": text.join,
        "sampling": "contiguous non-overlapping windows, tail dropped",
        "seqlen": seqlen,
        "n_windows": kept,
        "n_windows_total": total,
        "n_tokens": n_tokens,
        "bos": starts_with_bos(tokenizer, ids),
        "tokenizer": tokenizer_name(tokenizer),
    }
    if text.max_docs is not None:
        protocol["n_docs"] = len(rows)
        protocol["token_cap"] = text.max_windows * seqlen if text.max_windows is not None else None
    return EvalWindows(ids[: kept * seqlen].reshape(kept, seqlen).clone(), protocol)


def _c4_random_windows(tokenizer, seqlen: int, max_windows: int | None) -> EvalWindows:
    resolved = resolve_rows("c4", "validation")
    kept = _kept(C4_EVAL_WINDOWS, max_windows)
    # The draws are sequential, so the first `kept` windows of a full run are drawn by stopping
    # early: max_windows still selects a prefix.
    draws = draw_document_windows(
        resolved.rows,
        tokenizer,
        random.Random(C4_EVAL_SEED),
        kept,
        seqlen,
        accept_equal=True,  # the reference's validation loop accepts n >= seqlen
        dataset="c4",
    )
    protocol = {
        "dataset": "c4",
        "variant": resolved.variant,
        "split": "validation",
        "join": None,  # documents are tokenized one by one, never joined
        "sampling": "gptq-c4: random document with >= seqlen tokens, window start randint(0, n-seqlen-1)",
        "seed": C4_EVAL_SEED,
        "seqlen": seqlen,
        "n_windows": kept,
        "n_windows_total": C4_EVAL_WINDOWS,
        "n_docs": len(resolved.rows),
        # > 0 means the reference would have crashed on this text (see draw_document_windows).
        "exact_length_docs": draws.exact_length_docs,
        "bos": starts_with_bos(tokenizer, draws.first_doc_ids),
        "tokenizer": tokenizer_name(tokenizer),
    }
    return EvalWindows(torch.stack(draws.windows), protocol)


def eval_windows(name: str, tokenizer, seqlen: int, max_windows: int | None = None) -> EvalWindows:
    """Evaluation windows of `name` (one of EVAL_DATASETS) for `tokenizer` at context `seqlen`.

    `max_windows` (None = all) keeps the first windows; the protocol records both the number
    used (`n_windows`) and the number available (`n_windows_total`).
    """
    if name not in EVAL_DATASETS:
        raise ValueError(f"unknown evaluation dataset {name!r}; known: {', '.join(EVAL_DATASETS)}")
    _check_sizes(seqlen, max_windows)
    if name == "c4":
        return _c4_random_windows(tokenizer, seqlen, max_windows)
    return _stream_windows(name, tokenizer, seqlen, max_windows)
