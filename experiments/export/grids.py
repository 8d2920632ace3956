"""Re-expressing a uniform grid at another group size, exactly.

Formats that need the group size to divide a layer's width (compressed-tensors' group strategy,
AutoAWQ's GEMM, GGUF's 32-column blocks) cannot hold the short last group that our grids have
when it does not (SmolLM2's 576 = 4.5 x 128: four groups of 128 and one of 64). Such a grid is
the same grid at a group size g that divides both: every group of 128 becomes 128 / g groups of g
sharing its (scale, zero), and the weights are unchanged; only more scales are stored.
"""

from __future__ import annotations

import math

import torch

from quantlab.kernels.uniform import UniformWeight


def dividing_group_size(fmt: UniformWeight) -> int:
    """The largest group size that divides the layer's width and every run of its groups:
    its own group size when that divides the width; -1 for a per-channel grid."""
    in_features = fmt.shape[1]
    if fmt.group_size == -1 or fmt.group_size >= in_features:
        return -1
    return math.gcd(fmt.group_size, in_features)


def common_group_size(formats: dict[str, UniformWeight]) -> int:
    """One group size for every layer (formats with a single model-wide group size): the gcd of
    each layer's dividing group size; -1 when every layer is per channel."""
    sizes = [dividing_group_size(fmt) for fmt in formats.values()]
    if all(size == -1 for size in sizes):
        return -1
    common = 0
    for fmt, size in zip(formats.values(), sizes):
        common = math.gcd(common, fmt.shape[1] if size == -1 else size)  # per channel: any divisor of the width
    return common


def regrouped(fmt: UniformWeight, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) [out, in / group_size] of `fmt` at `group_size` (-1: [out, 1]); every
    column run of `group_size` must lie inside one group of `fmt` (the caller's choice of size
    guarantees it; checked)."""
    out_features, in_features = fmt.shape
    if group_size == -1:
        if fmt.n_groups != 1:
            raise ValueError("a per-channel layout needs one group per row")
        return fmt.scales, fmt.zeros
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the width {in_features}")
    runs = fmt.g_idx.long().reshape(-1, group_size)
    if not bool((runs == runs[:, :1]).all()):
        raise ValueError(f"columns of one run of {group_size} belong to different groups")
    index = runs[:, 0].to(fmt.scales.device)
    return fmt.scales[:, index], fmt.zeros[:, index]
