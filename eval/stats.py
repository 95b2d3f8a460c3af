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


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean (sample std / sqrt(n)); None below two values."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else None


def cohen_kappa(a: Sequence, b: Sequence, weights: str | None = None) -> float | None:
    """Cohen's kappa of two raters' labels for the same items: (observed - chance agreement) / (1 - chance).

    `weights="quadratic"`: numeric labels (scores), a disagreement weighing (x - y)^2, the usual choice for an
    ordinal scale. None where kappa is undefined: no items, or chance agreement is already total (both raters gave
    one and the same label to everything)."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs the same items from both raters, got {len(a)} and {len(b)} labels")
    if weights not in (None, "quadratic"):
        raise ValueError(f"weights must be None or 'quadratic', got {weights!r}")
    if not a:
        return None
    labels = sorted(set(a) | set(b))
    index = {label: i for i, label in enumerate(labels)}
    observed = np.zeros((len(labels), len(labels)))
    for x, y in zip(a, b):
        observed[index[x], index[y]] += 1
    observed /= len(a)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    if weights == "quadratic":
        values = np.asarray(labels, dtype=np.float64)
        w = (values[:, None] - values[None, :]) ** 2
    else:
        w = 1.0 - np.eye(len(labels))
    chance = float((w * expected).sum())
    if chance <= 0:
        return None
    return 1.0 - float((w * observed).sum()) / chance


LC_PENALTY = 0.1  # L2 on the two coefficients: finite when one side wins everything (no separation blow-up)


def length_controlled_win_rate(
    outcomes: Sequence[float], length_a: Sequence[float], length_b: Sequence[float], penalty: float = LC_PENALTY
) -> float | None:
    """AlpacaEval 2's length-controlled win rate of A over B, for two models.

    A logistic regression of each item's outcome (1 win, 0.5 tie, 0 loss; a tie is a soft label) on
    tanh(length difference / its standard deviation), fitted by Newton's method with a small L2 penalty; the win
    rate is then predicted with the length term set to zero: sigmoid(intercept). AlpacaEval's model also has an
    instruction-difficulty term fitted across many models; with two models there is nothing to fit it on."""
    y = np.asarray(outcomes, dtype=np.float64)
    if y.size == 0:
        return None
    diff = np.asarray(length_a, dtype=np.float64) - np.asarray(length_b, dtype=np.float64)
    scale = diff.std(ddof=1) if diff.size > 1 else 0.0
    x = np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff)
    features = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-features @ theta))
        gradient = features.T @ (p - y) + penalty * theta
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + penalty * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-12:
            break
    return float(1.0 / (1.0 + np.exp(-theta[0])))
