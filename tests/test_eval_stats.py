"""Aggregation math on fixed numbers: exact where deterministic, fixed-seed values for the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.stats import (
    LC_PENALTY,
    bootstrap_ci,
    cohen_kappa,
    length_controlled_win_rate,
    paired_difference,
    standard_error,
    summarize,
    win_tie_loss,
)

A = [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
B = [85, 80, 75, 50, 50, 45, 20, 20, 0, 5]


def test_summarize_exact():
    s = summarize(A)
    assert (s["n"], s["mean"], s["median"]) == (10, 45.0, 45.0)
    assert s["std"] == pytest.approx(math.sqrt(8250 / 9), abs=1e-12)  # sample std, ddof=1
    low, high = s["ci95"]
    assert low < 45.0 < high
    assert (low, high) == pytest.approx((27.0, 62.0), abs=1e-9)  # seed 123, 10,000 resamples


def test_summarize_edges():
    assert summarize([]) == {"n": 0, "mean": None, "median": None, "std": None, "ci95": None}
    assert summarize([7]) == {"n": 1, "mean": 7.0, "median": 7.0, "std": None, "ci95": (7.0, 7.0)}
    assert summarize([1, 2, 3, 10])["median"] == 2.5


def test_win_tie_loss_and_paired_difference():
    assert win_tie_loss(A, B) == {"wins": 4, "ties": 3, "losses": 3}
    assert win_tie_loss(B, A) == {"wins": 3, "ties": 3, "losses": 4}
    d = paired_difference(A, B)
    assert (d["n"], d["mean_diff"], d["wins"], d["ties"], d["losses"]) == (10, 2.0, 4, 3, 3)
    assert d["ci95"][0] < 2.0 < d["ci95"][1]
    assert d["ci95"] == pytest.approx((-1.5, 5.5), abs=1e-9)
    with pytest.raises(ValueError, match="equal length"):
        paired_difference(A, B[:-1])


def test_bootstrap_is_seeded_and_calibrated():
    assert bootstrap_ci(A) == bootstrap_ci(A)
    assert bootstrap_ci(A, seed=1) != bootstrap_ci(A)
    assert bootstrap_ci(A, resamples=2500) != bootstrap_ci(A)  # a partial last chunk is drawn too
    x = np.random.default_rng(0).normal(50, 10, size=400)
    low, high = bootstrap_ci(x)
    assert high - low == pytest.approx(2 * 1.96 * x.std(ddof=1) / math.sqrt(x.size), rel=0.1)
    assert low < x.mean() < high


def test_cohen_kappa_matches_scikit_learn_and_the_textbook():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 60).tolist(), rng.integers(0, 5, 60).tolist()
    b[:30] = a[:30]  # half agree by construction
    for weights in (None, "quadratic"):  # consecutive labels: value and rank weights are the same
        assert cohen_kappa(a, b, weights) == pytest.approx(cohen_kappa_score(a, b, weights=weights), abs=1e-12)
    # Wikipedia's example: 50 proposals, 20 yes-yes, 15 no-no, 5 and 10 split: kappa 0.4.
    first = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    # Scores weigh by value, not rank: 0 vs 100 is far, whatever scores lie between.
    assert cohen_kappa([0, 100, 50, 50], [0, 100, 40, 60], "quadratic") == pytest.approx(1 - 50 / 2550)
    assert cohen_kappa(["tie"] * 4, ["tie"] * 4) is None and cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa([1, 2], [1])


def test_length_controlled_win_rate_is_the_intercept_of_a_logistic_fit():
    from scipy.optimize import minimize

    outcomes = np.array([1, 1, 0.5, 0, 1, 0, 1, 1.0])
    length_a, length_b = np.array([50, 80, 30, 20, 90, 10, 60, 40.0]), np.full(8, 45.0)
    x = np.tanh((length_a - length_b) / (length_a - length_b).std(ddof=1))
    features = np.stack([np.ones(8), x], axis=1)

    def loss(theta):  # cross-entropy on soft labels + the same L2 penalty
        z = features @ theta
        return (np.logaddexp(0, z) - outcomes * z).sum() + LC_PENALTY / 2 * theta @ theta

    theta = minimize(loss, np.zeros(2), tol=1e-12).x
    lc = length_controlled_win_rate(outcomes, length_a, length_b)
    assert lc == pytest.approx(1 / (1 + np.exp(-theta[0])), abs=1e-6)
    assert length_controlled_win_rate(1 - outcomes, length_b, length_a) == pytest.approx(1 - lc)  # B's view
    same = length_controlled_win_rate([1, 0.5, 0, 1], [5] * 4, [5] * 4)  # no length difference: the raw rate, shrunk
    assert 0.5 < same < 0.625 and length_controlled_win_rate([], [], []) is None
    assert standard_error([1, 0.5, 0, 1]) == pytest.approx(np.std([1, 0.5, 0, 1], ddof=1) / 2)
