"""The data stages' settings, one pydantic model per stage: every default lives here.

The models double as Prefect flow parameters and as the `config` part of each stage's manifest.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _check_fractions(value: tuple[float, float, float]) -> tuple[float, float, float]:
    if any(f <= 0 for f in value):
        raise ValueError(f"every split fraction must be > 0, got {value}")
    if not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must sum to 1, got {value} (sum {sum(value):g})")
    return value


# train / validation / test shares: three positive numbers summing to 1
Fractions = Annotated[tuple[float, float, float], AfterValidator(_check_fractions)]


class LabelledDataConfig(BaseModel):
    """Clean, balance and split a labelled text set (the SMS spam set or a user's CSV)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    balance: Literal["undersample", "none"] = Field(
        default="undersample",
        description="undersample: every class cut to the smallest class's size (seeded); none: natural ratio",
    )
    seed: int = Field(default=123, description="seed of balancing and splitting (the book uses 123)")
    fractions: Fractions = Field(
        default=(0.7, 0.1, 0.2), description="train / validation / test shares, stratified by class"
    )


class SpamDataConfig(LabelledDataConfig):
    """The UCI SMS Spam Collection; the defaults reproduce the book's 1045/149/300 split sizes."""


class CsvDataConfig(LabelledDataConfig):
    """A user's CSV/TSV: which column holds the text and which the label."""

    text_column: str = Field(min_length=1)
    label_column: str = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_columns(self) -> "CsvDataConfig":
        if self.text_column == self.label_column:
            raise ValueError(f"the text and the label column are both {self.text_column!r}: name two columns")
        return self


class InstructionDataConfig(BaseModel):
    """Instruction/response pairs (Alpaca-style JSON) split into train/validation/test."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 123
    book_split: bool = Field(
        default=False,
        description="the book's unshuffled split: file order, train = first share, then test, then "
        "validation (its 110 test entries are the ones its judge scores refer to)",
    )
    fractions: Fractions = Field(default=(0.85, 0.05, 0.10), description="train / validation / test shares")


class CorpusConfig(BaseModel):
    """A text corpus tokenized for pretraining: the last `val_fraction` of the tokens is validation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    val_fraction: float = Field(default=0.1, gt=0, lt=1)
