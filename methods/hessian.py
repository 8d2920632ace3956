"""The layer-wise Hessian proxy H = (2/N) sum_tokens x x^T of GPTQ, OWQ and SliM-LLM (reference/methods.md §1.2).

N counts calibration *sequences*, not tokens, as in the references (`gptq:gptq.py add_batch`). Each
call rescales the running H by n / (n + b), sets n += b, and adds (sqrt(2/n) X)^T (sqrt(2/n) X)
over all tokens X of the b new sequences, scaling after the cast to fp32 (an fp16 X overflows
otherwise: GPTQ-for-LLaMa PR #169).

Equivalence with the reference's per-sample loop: after any sequence of calls with batch sizes
b_1, b_2, ... the state is H = (2/n) sum over all tokens seen of x x^T with n = sum b_k, because
(2/n_old) S * n_old/(n_old + b) + (2/n_new) S_new = (2/n_new)(S + S_new). Feeding one sequence per
call (the reference's b = 1) or a whole batch in one matmul therefore gives the same H up to float
rounding (tested in tests/methods/test_hessian.py). Only the scale of H depends on N; GPTQ's
damping is relative to mean(diag H), so its result does not.

"Up to float rounding" is not nothing: at 3 bits GPTQ amplifies a last-bit difference in H into
different codes (README, "GPTQ: reference numerics"). `reference_order=True` accumulates as the
reference does, to the bit: one call per forward (the reference's forwards hold one sequence; the
driver's `sequences_per_forward` arranges that), the full product X^T X in the reference's operand
layout, added after the product (tests/methods/test_gptq_reference_numerics.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from quantlab.methods.block import BlockView

SYMMETRIC_TILE = 256  # column tile for the lower-triangle Gram update


def add_gram_(target: torch.Tensor, tokens: torch.Tensor) -> None:
    """target += tokens^T tokens, computing only the tiles on and below the diagonal and mirroring
    them: k tiles cost (k + 1) / 2k of the full product (5/8 at k = 4), the Hessian being ~90% of a
    block forward's FLOPs. Each tile is one GEMM, so BLAS stays at full speed."""
    n = tokens.shape[1]
    if n <= SYMMETRIC_TILE:
        target.addmm_(tokens.T, tokens)
        return
    starts = list(range(0, n, SYMMETRIC_TILE))
    for i in starts:
        rows = tokens[:, i : i + SYMMETRIC_TILE]
        # tiles (i, j) for j <= i, as one GEMM over the columns [0, i + tile)
        lower = rows.T @ tokens[:, : i + rows.shape[1]]
        target[i : i + rows.shape[1], : i + rows.shape[1]] += lower
        if i:
            target[: i, i : i + rows.shape[1]] += lower[:, :i].T


def add_gram_reference_(target: torch.Tensor, tokens: torch.Tensor) -> None:
    """target += tokens^T tokens as `gptq:gptq.py add_batch` computes it: the input transposed to
    [in, tokens], multiplied by its transpose, then added (a fused addmm_ rounds differently)."""
    inp = tokens.t()
    target += inp.matmul(inp.t())


class HessianAccumulator:
    """Running (2/N) X^T X for one linear layer's input, in fp32 on `device`; `reference_order`:
    each product as the reference computes it (`add_gram_reference_`), not the tiled `add_gram_`."""

    def __init__(
        self, in_features: int, device: torch.device | str | None = None, reference_order: bool = False
    ) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_sequences = 0
        self._add_gram = add_gram_reference_ if reference_order else add_gram_
        self.seconds = 0.0  # time spent accumulating (on CUDA, kernel launch time unless synchronized)

    def add(self, inputs: torch.Tensor, n_sequences: int | None = None) -> None:
        """Add the inputs of `n_sequences` sequences: [b, tokens, in] (b sequences by default) or
        [tokens, in] (one sequence by default, like the reference's 2-D case)."""
        if inputs.shape[-1] != self.hessian.shape[0]:
            raise ValueError(f"inputs have {inputs.shape[-1]} features, the Hessian {self.hessian.shape[0]}")
        if n_sequences is None:
            n_sequences = inputs.shape[0] if inputs.dim() == 3 else 1
        if n_sequences < 1:
            raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
        start = time.perf_counter()
        tokens = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.device)
        self.hessian *= self.n_sequences / (self.n_sequences + n_sequences)
        self.n_sequences += n_sequences
        tokens = math.sqrt(2 / self.n_sequences) * tokens.float()
        self._add_gram(self.hessian, tokens)
        self.seconds += time.perf_counter() - start


def input_representatives(block: BlockView) -> dict[str, str]:
    """Each linear -> the first linear, in execution order, that receives the very same input.
    Linears of one scaling group share their input by definition (methods/block.py), and so do
    those of one input group (an adapter derived from the model found them reading one tensor);
    the adapter tables are tested to make that true (q/k/v after the attention norm, gate/up after
    the MLP norm)."""
    order = list(block.linears)
    representative = {name: name for name in order}
    shared = [group.linears for group in block.scaling_groups] + [tuple(g) for g in block.input_groups]
    for group in shared:
        members = [name for name in order if name in group]
        if members:
            first = representative[members[0]]  # already joined to an earlier group, perhaps
            representative.update(dict.fromkeys(members, first))
    return representative


def collect_hessians(
    block: BlockView, names: list[str], last_pass: bool = False, reference_order: bool = False,
    keep_inputs: dict[str, list[torch.Tensor]] | None = None,
) -> tuple[dict[str, HessianAccumulator], dict[str, float]]:
    """The Hessians of `names`, from one pass over the block's calibration inputs.

    One accumulator per distinct input, fed by the first linear that receives it; the pass stops as
    soon as the last needed input has been seen, so neither the linears sharing an input nor
    anything after them is computed. (The reference builds one Hessian per linear: the same
    operations on the same input, so the same bits; tests/methods/test_gptq_reference_numerics.py
    checks it on its transcription.) Returns the accumulator of each name and the pass's time
    split: `forward_seconds` (running the block) and `hessian_seconds` (the Gram updates).

    `keep_inputs`: a dict that receives, for each name, its input chunks in pass order (the same
    tensors the accumulator saw; linears sharing an input share the list), for a method that needs
    the inputs again after the Hessians (SliM-LLM's search) without another pass."""
    order = list(block.linears)
    representative = input_representatives(block)
    sources = sorted({representative[name] for name in names}, key=order.index)
    accumulators = {
        source: HessianAccumulator(
            block.linears[source].in_features, block.linears[source].weight.device, reference_order
        )
        for source in sources
    }
    hooks: dict[str, Callable[[torch.Tensor], None]] = {source: acc.add for source, acc in accumulators.items()}
    if keep_inputs is not None:
        kept: dict[str, list[torch.Tensor]] = {source: [] for source in sources}

        def keeping(source: str) -> Callable[[torch.Tensor], None]:
            def hook(x: torch.Tensor) -> None:
                accumulators[source].add(x)
                kept[source].append(x.detach())
            return hook

        hooks = {source: keeping(source) for source in sources}
        keep_inputs.update({name: kept[representative[name]] for name in names})
    start = time.perf_counter()
    block.run(hooks=hooks, stop_after=sources[-1], last_pass=last_pass)
    pass_seconds = time.perf_counter() - start
    hessian_seconds = sum(acc.seconds for acc in accumulators.values())
    timing = {"forward_seconds": pass_seconds - hessian_seconds, "hessian_seconds": hessian_seconds}
    return {name: accumulators[representative[name]] for name in names}, timing
