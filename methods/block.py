"""What a method may see of a model: one decoder block and its calibration inputs.

The architecture adapters in `experiments/` implement `BlockView`; methods only read weights,
run the block (or part of it) with hooks on its linears, and commit quantized weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kernels import QuantizedWeight

LinearHook = Callable[[torch.Tensor], None]  # receives a linear's input, [sequences, seqlen, in_features]


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that share one input, and the op right before them whose output can absorb a
    per-channel scale (AWQ, reference/methods.md §4.3). `prev_op` is a norm or a linear, by its
    name inside the block; `inspect` is the sub-module whose output measures the effect of the
    group (e.g. the whole attention for q/k/v)."""

    prev_op: str
    linears: tuple[str, ...]
    inspect: str


class BlockView(Protocol):
    index: int
    name: str  # full module name, e.g. "model.layers.3"
    family: str  # architecture family ("llama" for every llama-like model, "opt"): per-family method tables
    linears: Mapping[str, nn.Linear]  # name inside the block -> module, in execution order
    sequential_groups: Sequence[Sequence[str]]  # e.g. [k,v,q] -> [o] -> [up,gate] -> [down]
    true_sequential_default: bool  # the reference's default for this family (LLaMA on, OPT off)
    scaling_groups: Sequence[ScalingGroup]
    n_sequences: int  # calibration sequences this block sees
    n_tokens: int

    def run(
        self,
        hooks: Mapping[str, LinearHook] | None = None,
        stop_after: str | None = None,
        last_pass: bool = False,
    ) -> None:
        """Run every calibration sequence through the block with its current weights, calling
        `hooks[name]` with the input of each hooked linear. With `stop_after`, each forward stops
        as soon as that linear's input has been seen (no wasted compute after it). `last_pass`
        promises that the method will not run the block again: the view may then keep only what
        the output pass needs (the mid-block residual), so that pass skips the attention."""

    def commit(self, name: str, qweight: QuantizedWeight, seconds: float, **info: object) -> None:
        """Replace the linear's weight with `qweight.dequantize()` and record the layer."""
