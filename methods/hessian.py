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
"""

from __future__ import annotations

import math

import torch


class HessianAccumulator:
    """Running (2/N) X^T X for one linear layer's input, in fp32 on `device`."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_sequences = 0

    def add(self, inputs: torch.Tensor, n_sequences: int | None = None) -> None:
        """Add the inputs of `n_sequences` sequences: [b, tokens, in] (b sequences by default) or
        [tokens, in] (one sequence by default, like the reference's 2-D case)."""
        if inputs.shape[-1] != self.hessian.shape[0]:
            raise ValueError(f"inputs have {inputs.shape[-1]} features, the Hessian {self.hessian.shape[0]}")
        if n_sequences is None:
            n_sequences = inputs.shape[0] if inputs.dim() == 3 else 1
        if n_sequences < 1:
            raise ValueError(f"n_sequences must be >= 1, got {n_sequences}")
        tokens = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.device)
        self.hessian *= self.n_sequences / (self.n_sequences + n_sequences)
        self.n_sequences += n_sequences
        tokens = math.sqrt(2 / self.n_sequences) * tokens.float()
        self.hessian += tokens.T @ tokens
