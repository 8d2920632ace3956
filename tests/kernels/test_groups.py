import pytest
import torch

from quantlab.kernels.groups import (
    Segment,
    contiguous_g_idx,
    contiguous_g_idx_skipping,
    full_groups,
    group_bounds,
    num_groups,
    segments,
)

WIDTHS_AND_GROUPS = [(576, 128), (512, 128), (100, 128), (10, 4), (7, 1), (1, 3), (4096, -1), (33, 32), (0, 8)]


def test_group_bounds_with_short_last_group():
    assert group_bounds(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert group_bounds(576, -1) == [(0, 576)]
    assert group_bounds(100, 128) == [(0, 100)]
    assert group_bounds(0, 8) == []


@pytest.mark.parametrize(("width", "group_size"), WIDTHS_AND_GROUPS)
def test_bounds_count_and_g_idx_agree(width, group_size):
    bounds = group_bounds(width, group_size)
    assert num_groups(width, group_size) == len(bounds) or (width == 0 and group_size == -1)
    g_idx = contiguous_g_idx(width, group_size)
    assert g_idx.dtype == torch.int32 and g_idx.shape == (width,)
    for g, (start, end) in enumerate(bounds):
        assert torch.all(g_idx[start:end] == g)
    # the bounds tile the row in order
    assert [s for s, _ in bounds[1:]] == [e for _, e in bounds[:-1]]


@pytest.mark.parametrize(("width", "group_size"), WIDTHS_AND_GROUPS)
def test_segments_batch_exactly_the_groups(width, group_size):
    segs = segments(width, group_size)
    assert len(segs) <= 2
    groups = []
    for seg in segs:
        assert isinstance(seg, Segment) and seg.end - seg.start == seg.n_groups * seg.group_width
        assert seg.first_group == len(groups)
        groups += [(seg.start + i * seg.group_width, seg.start + (i + 1) * seg.group_width) for i in range(seg.n_groups)]
    assert groups == (group_bounds(width, group_size) if width else [])
    n_full, tail_start = full_groups(width, group_size)
    assert sum(seg.n_groups for seg in segs if seg.start < tail_start) == n_full
    assert tail_start == (segs[0].end if n_full else 0)


def test_segments_of_576_at_g128():
    assert segments(576, 128) == [Segment(0, 512, 4, 128, 0), Segment(512, 576, 1, 64, 4)]
    assert full_groups(576, 128) == (4, 512)
    assert full_groups(512, 128) == (4, 512)
    assert segments(300, -1) == [Segment(0, 300, 1, 300, 0)]


def test_segment_reshape_batches_a_per_group_reduction():
    torch.manual_seed(0)
    w = torch.randn(6, 576)
    batched = torch.cat([seg.reshape(w).amax(dim=-1) for seg in segments(576, 128)], dim=1)
    looped = torch.stack([w[:, s:e].amax(dim=1) for s, e in group_bounds(576, 128)], dim=1)
    assert torch.equal(batched, looped)
    assert segments(576, 128)[0].reshape(w).shape == (6, 4, 128)


def test_g_idx_skipping_outlier_columns():
    skip = torch.tensor([2, 7])
    g_idx = contiguous_g_idx_skipping(10, 3, skip)
    # the 8 remaining columns form groups of 3, 3, 2 in order; skipped columns get group 0
    assert g_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 2, 2]
    assert torch.equal(contiguous_g_idx_skipping(10, 3, None), contiguous_g_idx(10, 3))


def test_invalid_group_size_is_refused():
    with pytest.raises(ValueError, match="group_size"):
        group_bounds(10, 0)
    with pytest.raises(ValueError, match="group_size"):
        segments(10, -2)
