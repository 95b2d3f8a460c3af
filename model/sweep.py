"""Hyper-parameter sweeps: the classifier configs that a grid of field values makes, every combination."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from gptflow.errors import GptflowError, dotted, validation_message
from model.configs import ClassifierConfig


class SweepError(GptflowError, ValueError):
    """A grid that makes no sweep; the message names the field or the value."""


def grid_variants(
    config: ClassifierConfig, grid: Mapping[str, Sequence[Any]]
) -> list[tuple[dict[str, Any], ClassifierConfig]]:
    """(the variant's grid values, its config) for every combination of the grid's values, `config` giving every
    other field; the last field of the grid varies fastest. Each variant is validated, a single classifier, and a
    different one from the others (a run setting such as `threads` makes none); a sweep needs two or more."""
    if config.ensemble:
        raise SweepError(
            "a sweep trains single classifiers: the config's ensemble must be empty (sweep the seed instead)"
        )
    fields = ClassifierConfig.model_fields
    for name, values in grid.items():
        if name not in fields:
            sweepable = [f for f in fields if f not in ClassifierConfig.RUN_ONLY and f != "ensemble"]
            raise SweepError(f"grid: {name!r} is not a ClassifierConfig field; fields: {', '.join(sweepable)}")
        if name == "ensemble":
            raise SweepError("grid: ensemble: a sweep trains single classifiers (sweep the seed instead)")
        if name in ClassifierConfig.RUN_ONLY:
            raise SweepError(f"grid: {name} is a run setting: it does not change the classifier a variant trains")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise SweepError(f"grid: {name}: expected a list of one or more values, got {values!r}")
    base = config.model_dump()
    variants: list[tuple[dict[str, Any], ClassifierConfig]] = []
    seen: dict[str, str] = {}
    for values in itertools.product(*grid.values()):
        update = dict(zip(grid, values))
        label = variant_label(update)
        try:
            variant = ClassifierConfig.model_validate({**base, **update})
        except ValidationError as exc:

            def where(loc: tuple) -> str:
                return f"grid: {dotted(loc)}={update[loc[0]]!r}" if loc[0] in update else f"grid: {dotted(loc)}"

            raise SweepError(validation_message(exc, where, f"grid: variant {label}")) from None
        key = json.dumps(variant.identity(), sort_keys=True)
        if key in seen:
            raise SweepError(f"grid: variants {seen[key]} and {label} train the same classifier")
        seen[key] = label
        dumped = variant.model_dump(mode="json")
        variants.append(({name: dumped[name] for name in grid}, variant))
    if len(variants) < 2:
        raise SweepError(
            f"grid: {len(variants)} variant; a sweep trains 2 or more (give a field 2 or more values), "
            "one classifier is `gptflow finetune-classifier`"
        )
    return variants


def variant_label(fields: Mapping[str, Any]) -> str:
    """`seed=1 lr=0.0001`: a variant named by its grid values."""
    return " ".join(f"{name}={value}" for name, value in fields.items())
