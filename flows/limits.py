"""A run's time limit from its parameters: deployments pass `timeout_minutes`, which a flow decorator cannot read."""

from __future__ import annotations

import contextlib
from typing import Iterator

from prefect.utilities.timeout import timeout


class RunTimeLimit(TimeoutError):
    """The run took longer than its `timeout_minutes`; Prefect ends it in state TimedOut (a failure, alerted)."""


@contextlib.contextmanager
def time_limit(minutes: float | None, what: str) -> Iterator[None]:
    try:
        with timeout(seconds=minutes * 60 if minutes else None, timeout_exc_type=RunTimeLimit):
            yield
    except RunTimeLimit:
        raise RunTimeLimit(
            f"{what} exceeded its time limit of {minutes:g} minutes (parameter timeout_minutes)"
        ) from None
