"""GPT model configuration and named presets (the GPT-2 family plus small CPU presets)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from gptflow.errors import GptflowError, validation_message
from gptflow.strict import StrictConfig


class ModelConfigError(GptflowError, ValueError):
    """An unknown preset name or an invalid model shape."""


class GPTConfig(StrictConfig):
    """Shape of a GPT-2 style model. Frozen: a config is a value, hashed into manifests."""

    vocab_size: int = Field(default=50257, gt=0)
    context_length: int = Field(default=1024, gt=0)
    emb_dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    qkv_bias: bool = True
    tie_weights: bool = True

    @model_validator(mode="after")
    def _heads_divide_emb(self) -> "GPTConfig":
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """A named preset, optionally with some fields replaced (e.g. `context_length=256`)."""
        if name not in PRESETS:
            raise ModelConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name].model_dump(), **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        """Validate a plain dict (as stored in checkpoints); errors name the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ModelConfigError(f"invalid model config: {validation_message(exc)}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def n_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count of `GPTModel(self)` without building it."""
        e, v, t, layers = self.emb_dim, self.vocab_size, self.context_length, self.n_layers
        norms = 2 * 2 * e  # two LayerNorms
        attention = e * 3 * e + (3 * e if self.qkv_bias else 0) + e * e + e  # fused q, k, v; output projection
        mlp = e * 4 * e + 4 * e + 4 * e * e + e
        per_block = norms + attention + mlp
        total = layers * per_block + 2 * e  # final norm
        if include_embeddings:
            total += v * e + t * e + (0 if self.tie_weights else v * e)
        elif not self.tie_weights:
            total += v * e
        return total


PRESETS: dict[str, GPTConfig] = {
    # The public GPT-2 checkpoints (Hugging Face openai-community/<name>).
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # CPU presets: `tiny` for tests, `mini` for `make run` (trains usefully on 2 CPU cores; times: docs/pipeline.md).
    "tiny": GPTConfig(context_length=128, emb_dim=64, n_layers=2, n_heads=2),
    "mini": GPTConfig(context_length=256, emb_dim=256, n_layers=4, n_heads=4),
}


def _known_preset(name: str) -> str:
    if name not in PRESETS:  # a custom error: its message is ours alone, without pydantic's "Value error, "
        raise PydanticCustomError("unknown_preset", f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return name


# A preset name, checked when a config is made (a stage config's `preset: Preset = "mini"`).
Preset = Annotated[str, AfterValidator(_known_preset)]

# Hugging Face repository names of the public presets.
HF_NAMES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
}
