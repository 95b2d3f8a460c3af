"""Aggregate judge scores: location, spread, seeded bootstrap confidence intervals, paired comparisons."""

from __future__ import annotations

from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 123
CONFIDENCE = 0.95
_CHUNK = 1_000  # resamples drawn at once: bounds memory at CHUNK x n indices


def bootstrap_ci(
    values: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean; None for no values. Deterministic for a given seed."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            x[rng.integers(0, x.size, size=(min(_CHUNK, resamples - start), x.size))].mean(axis=1)
            for start in range(0, resamples, _CHUNK)
        ]
    )
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(values: Sequence[float], **bootstrap) -> dict:
    """n, mean, median, sample std (ddof=1) and the bootstrap CI of the mean; None where undefined."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    return {
        "n": n,
        "mean": float(x.mean()) if n else None,
        "median": float(np.median(x)) if n else None,
        "std": float(x.std(ddof=1)) if n > 1 else None,
        "ci95": bootstrap_ci(x, **bootstrap),
    }


def win_tie_loss(a: Sequence[float], b: Sequence[float]) -> dict[str, int]:
    """How often a beats, ties and loses to b, item by item."""
    x, y = _paired(a, b)
    return {"wins": int((x > y).sum()), "ties": int((x == y).sum()), "losses": int((x < y).sum())}


def paired_difference(a: Sequence[float], b: Sequence[float], **bootstrap) -> dict:
    """Mean of a - b over paired items, its bootstrap CI, and win/tie/loss counts of a against b."""
    x, y = _paired(a, b)
    diff = x - y
    return {
        "n": int(diff.size),
        "mean_diff": float(diff.mean()) if diff.size else None,
        "ci95": bootstrap_ci(diff, **bootstrap),
        **win_tie_loss(x, y),
    }


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    return x, y
