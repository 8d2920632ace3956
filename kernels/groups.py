"""Groups along a row: the one place that says which input columns share a (scale, zero).

A weight [out, in] is quantized in groups of `group_size` consecutive input columns per row
(`group_size == -1`: one group spanning the whole row). When `group_size` does not divide the
width, the last group is shorter (the GPTQ reference does this: SmolLM2's 576 = 4.5 x 128 gives
four groups of 128 and one of 64).

- `group_bounds(width, group_size)`: the (start, end) column range of every group.
- `num_groups(width, group_size)`: how many there are.
- `contiguous_g_idx(width, group_size)`: the group of every column, [width] int32.
- `contiguous_g_idx_skipping(width, group_size, skip)`: the same over the columns that remain once
  `skip` (e.g. OWQ's fp16 columns) are taken out; the skipped columns get group 0 (what GPTQ's
  export writes there).
- `segments(width, group_size)`: the runs of groups of equal width, so that a caller can batch:
  at most two segments, the full groups and then the short tail. Each segment can reshape a
  [..., width] tensor to [..., n_groups, group_width] in one view, e.g. a per-group min-max fit:

      for seg in segments(w.shape[1], group_size):
          blocks = seg.reshape(w)                       # [rows, seg.n_groups, seg.group_width]
          scale, zero = fit(blocks.reshape(-1, seg.group_width), grid)
          scales.append(scale.view(rows, seg.n_groups))  # groups seg.first_group .. + n_groups

  `full_groups(width, group_size)` gives the same split as (n_full_groups, tail_start).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def _check_group_size(group_size: int) -> None:
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be -1 (one group per row) or >= 1, got {group_size}")


def group_bounds(width: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges [start, end) of consecutive groups; the last one is shorter when group_size
    does not divide `width`; -1 (or a group wider than the row): one group."""
    _check_group_size(group_size)
    if group_size == -1:
        return [(0, width)]
    return [(start, min(start + group_size, width)) for start in range(0, width, group_size)]


def num_groups(width: int, group_size: int) -> int:
    """Number of groups of a row of `width` columns (the last may be short). -1: one group."""
    _check_group_size(group_size)
    return 1 if group_size == -1 else -(-width // group_size)


def contiguous_g_idx(width: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Group index of each input column when groups are consecutive runs (the last may be short)."""
    _check_group_size(group_size)
    if group_size == -1:
        return torch.zeros(width, dtype=torch.int32, device=device)
    return torch.arange(width, dtype=torch.int32, device=device) // group_size


def contiguous_g_idx_skipping(width: int, group_size: int, skip: torch.Tensor | None) -> torch.Tensor:
    """Group index of each column when the columns in `skip` are taken out and the others form
    consecutive runs of `group_size` in their original order (OWQ's groups around its fp16
    columns). The skipped columns carry no codes; they get group 0."""
    if skip is None or not skip.numel():
        return contiguous_g_idx(width, group_size)
    kept = torch.ones(width, dtype=torch.bool, device=skip.device)
    kept[skip.long()] = False
    g_idx = torch.zeros(width, dtype=torch.int32, device=skip.device)
    g_idx[kept] = contiguous_g_idx(int(kept.sum()), group_size, device=skip.device)
    return g_idx


def full_groups(width: int, group_size: int) -> tuple[int, int]:
    """(number of full groups, start of the short tail); tail_start == width when there is none.
    -1: the whole row is one full group."""
    _check_group_size(group_size)
    size = width if group_size == -1 else min(group_size, width)
    if size == 0:
        return 0, width
    n_full = width // size
    return n_full, n_full * size


class Segment(NamedTuple):
    """A run of `n_groups` groups of `group_width` columns each: columns [start, end),
    groups [first_group, first_group + n_groups)."""

    start: int
    end: int
    n_groups: int
    group_width: int
    first_group: int

    def reshape(self, t: torch.Tensor) -> torch.Tensor:
        """`t[..., start:end]` as [..., n_groups, group_width] (a view when `t` allows it)."""
        return t[..., self.start : self.end].reshape(*t.shape[:-1], self.n_groups, self.group_width)


def segments(width: int, group_size: int) -> list[Segment]:
    """The runs of equal-width groups along a row of `width` columns, in column order: the full
    groups (if any), then the shorter last group (if any). -1, or a group wider than the row: one
    segment holding one group of the whole row. Empty row: no segment."""
    n_full, tail_start = full_groups(width, group_size)
    out: list[Segment] = []
    if n_full:
        out.append(Segment(0, tail_start, n_full, tail_start // n_full, 0))
    if tail_start < width:
        out.append(Segment(tail_start, width, 1, width - tail_start, n_full))
    return out
