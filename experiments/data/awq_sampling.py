"""AWQ's calibration sampling (llm-awq `get_calib_dataset`, AutoAWQ the same; reference/methods.md §4.2).

Shuffle the rows with `datasets.Dataset.shuffle(seed)` (a permutation drawn by
`numpy.random.default_rng(seed)`, reproduced here without the `datasets` dependency), then take
rows in that order: strip, tokenize, skip any with more than `max_line_tokens` tokens (512 in
both references) or none at all, and stop after `n_lines` accepted rows (128 in llm-awq's entry.py).
All their tokens are concatenated into one stream and cut into consecutive `block_size`-token
blocks; the remainder is dropped, so there are floor(total / block_size) blocks, fewer than
`n_lines`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .sources import TextTooShort
from .tokenization import encode


@dataclass(frozen=True)
class AWQBlocks:
    blocks: torch.Tensor  # [n_blocks, block_size] int64
    lines_used: int  # accepted rows (== n_lines unless the text ran out)
    lines_skipped: int  # rows longer than max_line_tokens or empty, seen before stopping
    total_tokens: int  # tokens of the accepted rows, before cutting


def shuffled_order(n_rows: int, seed: int) -> np.ndarray:
    """The row order of `datasets.Dataset.shuffle(seed=seed)`."""
    return np.random.default_rng(seed).permutation(n_rows)


def draw_awq_blocks(
    rows: Sequence[str],
    tokenizer,
    n_lines: int,
    block_size: int,
    seed: int,
    max_line_tokens: int = 512,
    *,
    dataset: str,
) -> AWQBlocks:
    """The reference's calibration blocks from `rows` (see the module docstring)."""
    pieces: list[torch.Tensor] = []
    skipped = 0
    for index in shuffled_order(len(rows), seed):
        ids = encode(tokenizer, rows[int(index)].strip())
        if ids.numel() > max_line_tokens or ids.numel() == 0:
            skipped += 1
            continue
        pieces.append(ids)
        if len(pieces) == n_lines:
            break
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    n_blocks = stream.numel() // block_size
    if n_blocks == 0:
        raise TextTooShort(
            f"{dataset}: AWQ sampling found {len(pieces)} lines of at most {max_line_tokens} tokens "
            f"({stream.numel()} tokens), less than one block of {block_size}; raise calib.nsamples "
            "(the number of lines) or lower calib.seqlen"
        )
    blocks = stream[: n_blocks * block_size].view(n_blocks, block_size)
    return AWQBlocks(blocks, len(pieces), skipped, stream.numel())
