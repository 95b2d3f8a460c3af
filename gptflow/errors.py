"""The one base class for errors caused by the user's input, settings or environment, and the one formatter of a
pydantic ValidationError.

The CLI prints these as a one-line message and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pydantic import ValidationError


class GptflowError(Exception):
    """Bad input, a bad setting, or a missing external service: the message says what, where and what to do."""


def dotted(loc: tuple) -> str:
    return ".".join(map(str, loc))


def validation_message(exc: ValidationError, where: Callable[[tuple], str] = dotted, whole: str = "config") -> str:
    """The problems of a ValidationError on one line, `place: message` joined by "; ". `where` names the place of
    an error location as the user wrote it (a field path, a flag, an environment variable); `whole` names the
    place of an error of the whole model (a model validator's, which has no location)."""
    return "; ".join(f"{where(e['loc']) if e['loc'] else whole}: {e['msg']}" for e in exc.errors())
