"""Numeric gates that fail on NaN and infinity.

`diff > atol` is False when `diff` is NaN, so a gate written that way passes a broken model. Every gate (export
parity, int8 agreement and accuracy, perplexity, promotion) asks these instead: a value passes only when it is a
finite number on the right side of its bound.
"""

from __future__ import annotations

import math


def within(value: float, limit: float) -> bool:
    """True only for a finite `value` at most `limit`."""
    return math.isfinite(value) and value <= limit


def reaches(value: float, minimum: float) -> bool:
    """True only for a finite `value` at least `minimum`."""
    return math.isfinite(value) and value >= minimum
