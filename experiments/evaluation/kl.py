"""KL divergence to the full-precision model over the perplexity windows, and top-1 agreement,
without full-vocabulary logits on disk.

The baseline's perplexity pass records, for every predicted position, its top-k log-probabilities
(token ids and values) and the log of the probability mass left outside them. The quantized
model's perplexity pass then computes, in the same slices of logits it already makes,

    KL_k(P || Q) = sum_{v in S} p_v (log p_v - log q_v) + p_tail (log p_tail - log q_tail),

S the baseline's top-k tokens, p_tail = 1 - sum_S p_v and q_tail = 1 - sum_S q_v. This is the exact
KL between P and Q coarsened to the k+1 outcomes (each top-k token, "anything else"), so by the
log-sum inequality it is a lower bound on the full KL(P || Q), equal to it when S covers P's support
or Q is proportional to P outside S (estimator `topk_tail_lower_bound`).

On SmolLM2-135M the tail matters (RTN W4: top-64 gives 79% of the exact KL, top-256 89%), so by
default the baseline also stores m tokens drawn from P restricted to its tail (seeded, with
replacement) and their log p, and the tail's part of the KL, p_tail * E_{v ~ P_tail}[log p_v - log q_v],
is estimated by their mean (estimator `topk_plus_sampled_tail`): unbiased for the full KL, its
noise averaging out over the thousands of positions of a window, and still exactly 0 for a model
against itself. `estimator`, `top_k` and `tail_samples` are recorded with every number. A run
costs one log-softmax it already does plus a few gathers per slice, instead of a second model in
memory or gigabytes of logits (a 2048-token window of a 128k vocabulary is 1 GB in fp32).

Top-1 agreement: the share of positions where the quantized model's most likely token is the
baseline's (a tie at the top counts as agreement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from quantlab.experiments.evaluation.statistics import t_quantile_975

KL_CODE_VERSION = 2  # bump when the summary or the estimator changes: invalidates cached summaries
LOWER_BOUND = "topk_tail_lower_bound"
SAMPLED_TAIL = "topk_plus_sampled_tail"
TAIL_SEED = 0


def _tail_logmass(log_probs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `top_ids`, computed from the remaining entries (accurate even
    when the tail is tiny, where 1 - sum(top) would cancel)."""
    return log_probs.scatter(-1, top_ids, float("-inf")).logsumexp(dim=-1)


@dataclass
class TopKSummary:
    """The baseline's distributions over n windows x P predicted positions, in k + 1 numbers each."""

    top_ids: torch.Tensor  # [n, P, k] int32, by decreasing probability
    top_logp: torch.Tensor  # [n, P, k] float32
    tail_logp: torch.Tensor  # [n, P] float32, log of the mass outside the top k
    sample_ids: torch.Tensor | None = None  # [n, P, m] int32, drawn from P restricted to the tail
    sample_logp: torch.Tensor | None = None  # [n, P, m] float32, their log p

    @property
    def top_k(self) -> int:
        return self.top_ids.shape[-1]

    @property
    def tail_samples(self) -> int:
        return 0 if self.sample_ids is None else self.sample_ids.shape[-1]

    @property
    def estimator(self) -> str:
        return SAMPLED_TAIL if self.tail_samples else LOWER_BOUND

    @property
    def n_windows(self) -> int:
        return self.top_ids.shape[0]

    def as_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"top_ids": self.top_ids, "top_logp": self.top_logp, "tail_logp": self.tail_logp}
        if self.sample_ids is not None:
            tensors.update(sample_ids=self.sample_ids, sample_logp=self.sample_logp)
        return tensors

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> TopKSummary:
        return cls(tensors["top_ids"], tensors["top_logp"], tensors["tail_logp"], tensors.get("sample_ids"),
                   tensors.get("sample_logp"))


class TopKRecorder:
    """Observer of the baseline's perplexity pass: fills a TopKSummary for the first `n_windows`."""

    def __init__(self, n_windows: int, n_positions: int, top_k: int, tail_samples: int = 0) -> None:
        self.n_windows, self.top_k, self.tail_samples = n_windows, top_k, tail_samples
        self.top_ids = torch.zeros(n_windows, n_positions, top_k, dtype=torch.int32)
        self.top_logp = torch.zeros(n_windows, n_positions, top_k, dtype=torch.float32)
        self.tail_logp = torch.zeros(n_windows, n_positions, dtype=torch.float32)
        self.sample_ids = torch.zeros(n_windows, n_positions, tail_samples, dtype=torch.int32)
        self.sample_logp = torch.zeros(n_windows, n_positions, tail_samples, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(TAIL_SEED)

    def __call__(self, first_window: int, start: int, log_probs: torch.Tensor) -> None:
        count = min(log_probs.shape[0], self.n_windows - first_window)
        if count <= 0:
            return
        log_probs = log_probs[:count]
        k = min(self.top_k, log_probs.shape[-1])
        values, ids = log_probs.topk(k, dim=-1)
        end = start + log_probs.shape[1]
        rows = slice(first_window, first_window + count)
        self.top_ids[rows, start:end, :k] = ids.to(torch.int32).cpu()
        self.top_logp[rows, start:end, :k] = values.cpu()
        self.tail_logp[rows, start:end] = _tail_logmass(log_probs, ids).cpu()
        if self.tail_samples:
            tail = log_probs.scatter(-1, ids, float("-inf")).exp().cpu().flatten(0, 1)
            empty = tail.sum(dim=-1) <= 0  # no tail to draw from: any token, weighted by p_tail = 0 anyway
            tail[empty] = 1.0
            drawn = torch.multinomial(tail, self.tail_samples, replacement=True, generator=self.generator)
            drawn = drawn.view(count, -1, self.tail_samples).to(log_probs.device)
            self.sample_ids[rows, start:end] = drawn.to(torch.int32).cpu()
            self.sample_logp[rows, start:end] = log_probs.gather(-1, drawn).cpu()

    def summary(self) -> TopKSummary:
        if not self.tail_samples:
            return TopKSummary(self.top_ids, self.top_logp, self.tail_logp)
        return TopKSummary(self.top_ids, self.top_logp, self.tail_logp, self.sample_ids, self.sample_logp)


class KLAccumulator:
    """Observer of the quantized model's perplexity pass: KL_k and top-1 agreement against a
    baseline TopKSummary, per window."""

    def __init__(self, baseline: TopKSummary) -> None:
        self.baseline = baseline
        n = baseline.n_windows
        self.kl_sum = torch.zeros(n, dtype=torch.float64)
        self.agree = torch.zeros(n, dtype=torch.int64)
        self.positions = torch.zeros(n, dtype=torch.int64)

    def __call__(self, first_window: int, start: int, log_probs: torch.Tensor) -> None:
        count = min(log_probs.shape[0], self.baseline.n_windows - first_window)
        if count <= 0:
            return
        log_q = log_probs[:count]
        rows = slice(first_window, first_window + count)
        end = start + log_q.shape[1]
        ids = self.baseline.top_ids[rows, start:end].to(device=log_q.device, dtype=torch.int64)
        log_p = self.baseline.top_logp[rows, start:end].to(log_q.device).double()
        tail_p = self.baseline.tail_logp[rows, start:end].to(log_q.device).double()
        log_q_top = log_q.gather(-1, ids)
        top_terms = (log_p.exp() * (log_p - log_q_top.double())).sum(dim=-1)
        if self.baseline.sample_ids is not None:  # unbiased: p_tail * mean over tail draws of log p/q
            drawn = self.baseline.sample_ids[rows, start:end].to(device=log_q.device, dtype=torch.int64)
            log_p_drawn = self.baseline.sample_logp[rows, start:end].to(log_q.device).double()
            tail_log_ratio = (log_p_drawn - log_q.gather(-1, drawn).double()).mean(dim=-1)
        else:  # lower bound: the tail as one outcome
            tail_log_ratio = tail_p - _tail_logmass(log_q, ids).double()
        # an empty tail (k covers the vocabulary, or p_tail underflows) contributes nothing
        tail_terms = torch.where(torch.isinf(tail_p), torch.zeros_like(tail_p), tail_p.exp() * tail_log_ratio)
        kl = top_terms + tail_terms
        agree = log_q_top[..., 0] >= log_q.max(dim=-1).values
        self.kl_sum[rows] += kl.sum(dim=1).cpu()
        self.agree[rows] += agree.sum(dim=1).cpu()
        self.positions[rows] += kl.shape[1]

    def result(self) -> dict:
        done = self.positions > 0
        window_kl = (self.kl_sum[done] / self.positions[done]).tolist()
        n = len(window_kl)
        mean = sum(window_kl) / n if n else float("nan")
        ci_low = ci_high = None
        if n > 1:
            sd = math.sqrt(sum((x - mean) ** 2 for x in window_kl) / (n - 1))
            half = t_quantile_975(n - 1) * sd / math.sqrt(n)
            ci_low, ci_high = mean - half, mean + half
        positions = int(self.positions.sum())
        return {
            "mean_kl": mean, "ci_low": ci_low, "ci_high": ci_high,
            "top1_agreement": int(self.agree.sum()) / positions if positions else float("nan"),
            "n_windows": n, "n_positions": positions, "estimator": self.baseline.estimator,
            "top_k": self.baseline.top_k, "tail_samples": self.baseline.tail_samples,
            "window_kl": window_kl,
        }


def exact_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(P || Q) per position from log-probabilities [..., V] (tests, checks)."""
    log_p, log_q = log_p.double(), log_q.double()
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


# Run-level: which windows, and the baseline's summaries (cached with the baseline metrics)


def kl_windows(kl_config: Any, dataset: str, n_windows: int) -> int:
    """How many of a dataset's perplexity windows KL covers (0: none)."""
    if not kl_config.enabled or (kl_config.datasets is not None and dataset not in kl_config.datasets):
        return 0
    return min(n_windows, kl_config.max_windows or n_windows)


def baseline_summary(
    model: torch.nn.Module, arch: Any, windows: torch.Tensor, batch_size: int, top_k: int, tail_samples: int,
    n_windows: int, cache: Any, key: dict[str, Any],
) -> tuple[TopKSummary, float]:
    """The baseline's top-k summary of the first `n_windows` windows, from the cache or from one
    perplexity pass of the baseline (the first time only); returns it and the seconds spent."""
    from quantlab.experiments.evaluation.perplexity import perplexity

    spent = 0.0

    def compute() -> dict[str, torch.Tensor]:
        nonlocal spent
        recorder = TopKRecorder(n_windows, windows.shape[1] - 1, top_k, tail_samples)
        result = perplexity(model, arch, windows[:n_windows], batch_size, observer=recorder)
        spent = result.seconds
        return recorder.summary().as_dict()

    full_key = {**key, "kl_top_k": top_k, "kl_tail_samples": tail_samples, "kl_windows": n_windows,
                "kl_code": KL_CODE_VERSION}
    return TopKSummary.from_dict(cache.get_or_compute_tensors(full_key, compute)), spent
