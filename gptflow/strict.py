"""The base of every config model: frozen, unknown fields refused, numbers that are numbers.

Pydantic's lax mode reads YAML's `seed: true` as 1 and takes NaN or infinity for a float; a config that says
either is a mistake, so both are refused with the field's name, everywhere at once.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class StrictConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _kinds(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (`int | None` -> {int, NoneType}; Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    return {annotation}
