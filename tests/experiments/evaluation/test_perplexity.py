import math

import pytest
import torch
import torch.nn.functional as F

from quantlab.experiments.evaluation.perplexity import perplexity, summarize
from quantlab.experiments.evaluation.statistics import paired_delta


def test_perplexity_equals_a_direct_cross_entropy(tiny_llama):
    windows = torch.randint(0, 49152, (5, 64), generator=torch.Generator().manual_seed(1))
    result = perplexity(tiny_llama.model, tiny_llama.architecture, windows, batch_size=2)
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=windows).logits.float()
    per_window = [
        F.cross_entropy(logits[i, :-1], windows[i, 1:]).item() for i in range(windows.shape[0])
    ]
    # the GPTQ formula: exp(sum_w nll_w * L / (n * L))
    assert result.value == pytest.approx(math.exp(sum(per_window) / len(per_window)), rel=1e-5)
    assert result.window_nll == pytest.approx(per_window, rel=1e-5)
    assert result.n_windows == 5 and result.n_tokens == 5 * 63
    assert result.ci_low < result.value < result.ci_high


def test_batch_size_does_not_change_the_result(tiny_opt):
    windows = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(2))
    one = perplexity(tiny_opt.model, tiny_opt.architecture, windows, batch_size=1)
    four = perplexity(tiny_opt.model, tiny_opt.architecture, windows, batch_size=4)
    assert one.value == pytest.approx(four.value, rel=1e-5)


def test_interval_is_a_t_interval_on_the_mean_nll():
    nll = [2.0, 2.2, 1.9, 2.5]
    result = summarize(nll, seqlen=10, seconds=1.0)
    mean = sum(nll) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in nll) / 3)
    half = 3.182446 * sd / 2  # t(0.975, 3)
    assert result.ci_low == pytest.approx(math.exp(mean - half), rel=1e-5)
    assert result.ci_high == pytest.approx(math.exp(mean + half), rel=1e-5)
    assert summarize([2.0], 10, 1.0).ci_low is None


def test_paired_delta_cancels_window_difficulty():
    baseline = [1.0, 3.0, 2.0, 5.0]
    quantized = [b + 0.1 for b in baseline]
    delta = paired_delta(quantized, baseline)
    assert delta["mean_nll_delta"] == pytest.approx(0.1)
    assert delta["ci_high"] - delta["ci_low"] == pytest.approx(0.0, abs=1e-9)
    assert paired_delta([1.0], [1.0]) is None
