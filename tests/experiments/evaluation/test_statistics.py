import math
import random

import numpy as np
import pytest

from quantlab.experiments.evaluation.statistics import align, mean_stderr, paired_bootstrap, task_delta


def test_mean_stderr_is_lm_evals_formula():
    from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr

    values = [float(random.Random(3).random() < 0.6) for _ in range(57)]
    assert mean_stderr(values) == pytest.approx(lm_eval_mean_stderr(values), rel=1e-12)
    assert mean_stderr([1.0]) is None


def test_a_model_compared_with_itself_has_an_exactly_zero_interval():
    outcomes = [float(random.Random(0).random() < 0.5) for _ in range(300)]
    delta = paired_bootstrap(outcomes, outcomes)
    assert (delta["value"], delta["ci_low"], delta["ci_high"]) == (0.0, 0.0, 0.0)
    assert delta["gained"] == delta["lost"] == 0 and not delta["significant"]


def test_flips_and_a_significant_drop():
    rng = random.Random(1)
    baseline = [1.0] * 120 + [0.0] * 80
    # the quantized model loses 30 of the right answers and gains 5 of the wrong ones
    quantized = [0.0] * 30 + [1.0] * 90 + [1.0] * 5 + [0.0] * 75
    pairs = list(zip(quantized, baseline))
    rng.shuffle(pairs)
    q, b = map(list, zip(*pairs))
    delta = paired_bootstrap(q, b)
    assert delta["value"] == pytest.approx((95 - 120) / 200)
    assert (delta["lost"], delta["gained"]) == (30, 5)
    assert delta["ci_high"] < 0 and delta["significant"]
    assert delta["ci_low"] < delta["value"] < delta["ci_high"]
    # the same seed gives the same interval
    assert paired_bootstrap(q, b) == delta


def test_multinomial_draws_match_resampling_items():
    """The count-based bootstrap has the distribution of resampling item indices: both give the
    same interval up to Monte-Carlo error."""
    rng = np.random.default_rng(5)
    b = (rng.random(400) < 0.55).astype(float)
    q = np.where(rng.random(400) < 0.15, 1 - b, b)
    ours = paired_bootstrap(list(q), list(b), resamples=20_000)
    index = rng.integers(0, 400, size=(20_000, 400))
    means = (q - b)[index].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    assert ours["ci_low"] == pytest.approx(low, abs=0.006)
    assert ours["ci_high"] == pytest.approx(high, abs=0.006)
    # and the width is that of the paired normal approximation
    sd = (q - b).std(ddof=1) / math.sqrt(400)
    assert ours["ci_high"] - ours["ci_low"] == pytest.approx(2 * 1.96 * sd, rel=0.1)


def test_deltas_pair_items_by_doc_id():
    assert align([3, 1, 7], [1, 2, 3]) == [(0, 2), (1, 0)]
    quantized = {"doc_id": [0, 1, 2], "acc": [1.0, 0.0, 1.0], "acc_norm": [1.0, 1.0, 0.0]}
    baseline = {"doc_id": [2, 1, 0], "acc": [1.0, 1.0, 1.0], "acc_norm": [0.0, 1.0, 1.0]}
    delta = task_delta(quantized, baseline)
    assert delta["metric"] == "acc" and delta["value"] == pytest.approx(-1 / 3) and delta["lost"] == 1
    assert delta["acc_norm"]["value"] == 0.0 and delta["acc_norm"]["gained"] == 0
