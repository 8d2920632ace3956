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

from quantlab.kernels import QuantizedWeight

LinearHook = Callable[[torch.Tensor], None]  # receives a linear's input, [sequences, seqlen, in_features]


@dataclass
class ModuleCall:
    """One call of a block's sub-module during a calibration run: the positional and keyword
    arguments it received (tensors by reference, not copied). Replaying it on the sub-module runs
    that part of the block again with the current weights, with everything it got inside the
    block (position embeddings, masks): AWQ measures its loss on the whole attention this way."""

    args: tuple
    kwargs: dict

    @property
    def input(self) -> torch.Tensor:
        """The main input: the first positional argument, else `hidden_states` (HF attention
        modules are called with keywords only)."""
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def replay(self, module: nn.Module) -> torch.Tensor:
        """`module`'s output for this call (the first element when it returns a tuple)."""
        output = module(*self.args, **self.kwargs)
        return output[0] if isinstance(output, (tuple, list)) else output


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
    input_groups: Sequence[Sequence[str]]  # linears reading one input tensor, besides a scaling group's
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

    # For methods that transform the full-precision block before quantizing it (AWQ):

    def submodule(self, name: str) -> nn.Module:
        """The block's sub-module by its name inside the block (a norm, a linear, "self_attn",
        "mlp"); a method may change its parameters only by function-preserving transforms
        (e.g. folding a per-channel scale into a norm), before committing."""

    def capture(self, names: Sequence[str]) -> Mapping[str, list[ModuleCall]]:
        """Run every calibration sequence through the block once with its current weights and
        return, per named sub-module, its calls in calibration order (one per chunk of sequences).
        A linear's call holds its input; an attention's call also holds the masks and position
        embeddings the block passed it."""
