"""Spearman's rank correlation with average ranks for ties: a hand-computed case and scipy."""

from __future__ import annotations

import random

import pytest

from quantlab.experiments.evaluation.statistics import average_ranks, spearman


def test_average_ranks_share_the_mean_rank_of_a_tie():
    assert average_ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert average_ranks([7, 7, 7]) == [2, 2, 2]


def test_spearman_by_hand_with_ties():
    # ranks x: [1, 2.5, 2.5, 4]; y: [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5] and [-1.5, 0.5, -0.5, 1.5]
    # Σxy = 4.5, Σx² = 4.5, Σy² = 5  ->  4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [2]) is None


def test_spearman_equals_scipy_on_random_data_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 30)
        x = [rng.randint(0, 5) for _ in range(n)]  # many ties
        y = [rng.random() if rng.random() < 0.7 else 0.5 for _ in range(n)]
        ours = spearman(x, y)
        theirs = stats.spearmanr(x, y).statistic
        if ours is None:
            assert theirs != theirs  # nan: a constant side
        else:
            assert ours == pytest.approx(theirs, abs=1e-12)
