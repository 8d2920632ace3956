import copy

import pytest
import torch

from quantlab.experiments.evaluation.kl import KLAccumulator, TopKRecorder, TopKSummary, exact_kl
from quantlab.experiments.evaluation.perplexity import perplexity


@pytest.fixture(scope="module")
def models():
    from tests.conftest import _load

    base = _load("tiny-llama")
    perturbed = copy.deepcopy(base.model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3 * param.std())
    windows = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(0))
    return base, perturbed, windows


def _summary(base, windows, top_k, batch_size=2, tail_samples=0):
    recorder = TopKRecorder(windows.shape[0], windows.shape[1] - 1, top_k, tail_samples)
    perplexity(base.model, base.architecture, windows, batch_size, observer=recorder)
    return recorder.summary()


def _kl(model, arch, windows, summary, batch_size=1):
    accumulator = KLAccumulator(summary)
    result = perplexity(model, arch, windows, batch_size, observer=accumulator)
    return accumulator.result(), result


@pytest.mark.parametrize("tail_samples", [0, 8])
def test_kl_of_a_model_with_itself_is_zero(models, tail_samples):
    base, _, windows = models
    summary = _summary(base, windows, top_k=16, tail_samples=tail_samples)
    kl, _ = _kl(base.model, base.architecture, windows, summary, batch_size=2)
    assert kl["mean_kl"] == 0.0 and kl["top1_agreement"] == 1.0
    assert kl["n_windows"] == 3 and kl["n_positions"] == 3 * 23 and kl["tail_samples"] == tail_samples


def test_the_observer_does_not_change_perplexity(models):
    base, perturbed, windows = models
    plain = perplexity(perturbed, base.architecture, windows, 1)
    _, observed = _kl(perturbed, base.architecture, windows, _summary(base, windows, top_k=8))
    assert observed.window_nll == plain.window_nll


def test_estimator_is_exact_with_the_full_vocabulary_and_a_lower_bound_below(models):
    base, perturbed, windows = models
    with torch.no_grad():
        log_p = torch.log_softmax(base.model(input_ids=windows).logits.float(), -1)[:, :-1]
        log_q = torch.log_softmax(perturbed(input_ids=windows).logits.float(), -1)[:, :-1]
    exact = exact_kl(log_p, log_q).mean().item()
    assert exact > 1e-4
    estimates = []
    for top_k in (1, 256, 8192, 49152):
        kl, _ = _kl(perturbed, base.architecture, windows, _summary(base, windows, top_k))
        estimates.append(kl["mean_kl"])
        assert kl["top_k"] == top_k
        assert kl["top1_agreement"] == pytest.approx((log_p.argmax(-1) == log_q.argmax(-1)).double().mean().item())
    assert estimates[-1] == pytest.approx(exact, rel=1e-6)
    # coarsening can only lose divergence: non-decreasing in k, and at most the exact value
    assert all(a <= b + 1e-12 for a, b in zip(estimates, estimates[1:]))
    assert estimates[0] < exact


def test_sampled_tail_is_unbiased_where_the_bound_is_not(models):
    """The random tiny model spreads nearly all its mass beyond any top-k: the lower bound sees
    almost nothing, the sampled tail recovers the exact KL up to sampling noise."""
    base, perturbed, windows = models
    with torch.no_grad():
        log_p = torch.log_softmax(base.model(input_ids=windows).logits.float(), -1)[:, :-1]
        log_q = torch.log_softmax(perturbed(input_ids=windows).logits.float(), -1)[:, :-1]
    exact = exact_kl(log_p, log_q).mean().item()
    bound, _ = _kl(perturbed, base.architecture, windows, _summary(base, windows, top_k=16))
    sampled, _ = _kl(perturbed, base.architecture, windows, _summary(base, windows, top_k=16, tail_samples=512))
    assert bound["estimator"] == "topk_tail_lower_bound" and bound["mean_kl"] < 0.1 * exact
    assert sampled["estimator"] == "topk_plus_sampled_tail"
    assert sampled["mean_kl"] == pytest.approx(exact, rel=0.15)


def test_summary_round_trips_through_its_tensor_dict(models):
    base, _, windows = models
    summary = _summary(base, windows, top_k=4, tail_samples=3)
    again = TopKSummary.from_dict(summary.as_dict())
    assert torch.equal(again.top_ids, summary.top_ids) and torch.equal(again.sample_ids, summary.sample_ids)
    assert again.top_k == 4 and again.n_windows == 3 and again.tail_samples == 3
    # the draws come from the tail: never one of the top-k tokens
    assert not (summary.sample_ids.unsqueeze(-1) == summary.top_ids.unsqueeze(-2)).any()
