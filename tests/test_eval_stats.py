"""Aggregation math on fixed numbers: exact where deterministic, fixed-seed values for the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.stats import bootstrap_ci, paired_difference, summarize, win_tie_loss

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
