"""GPT model configuration and named presets: the GPT-2 family, the Llama family (SmolLM, SmolLM2, Llama 3.2),
Qwen3, and small CPU presets.

One config of switches drives one model module (`model.gpt`), the way litgpt's `Config` does: the three families
differ in five places (norm, MLP, positions, query groups, q/k norm), so one block with five switches reads shorter
than three copies of the same block. The defaults are GPT-2's, so a GPT-2 config names only its shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from gptflow.errors import GptflowError, validation_message
from gptflow.strict import StrictConfig

GPT2_VOCAB_SIZE = 50257  # GPT-2's BPE, which every corpus and data set here is tokenized with


class ModelConfigError(GptflowError, ValueError):
    """An unknown preset name or an invalid model shape."""


class RopeScaling(StrictConfig):
    """Llama 3's stretch of rotary frequencies to a longer context (`rope_scaling` with `rope_type: llama3`)."""

    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_context_length: int = Field(gt=0)


class GPTConfig(StrictConfig):
    """Shape of a decoder-only transformer. Frozen: a config is a value, hashed into manifests.

    The switches: `norm` (LayerNorm with biases, or RMSNorm), `mlp` (tanh-GELU with 4x width, or SwiGLU with
    `mlp_hidden`), `positions` (learned table, or rotary with `rope_theta`/`rope_scaling`), `n_kv_heads` (fewer
    key/value heads than query heads: grouped-query attention), `qk_norm` (RMSNorm on each head's queries and
    keys, Qwen3). `bias` covers the attention output and MLP projections, `qkv_bias` the query/key/value one.
    """

    vocab_size: int = Field(default=GPT2_VOCAB_SIZE, gt=0)
    context_length: int = Field(default=1024, gt=0)
    emb_dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    qkv_bias: bool = True
    tie_weights: bool = True
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(default=1e-5, gt=0)
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_hidden: int | None = Field(default=None, gt=0)
    bias: bool = True
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(default=10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    n_kv_heads: int | None = Field(default=None, gt=0)
    head_size: int | None = Field(default=None, gt=0)
    qk_norm: bool = False

    @model_validator(mode="after")
    def _heads_fit(self) -> "GPTConfig":
        if self.head_size is None and self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head: `emb_dim / n_heads` unless the model says otherwise (Qwen3: 128)."""
        return self.head_size or self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.mlp_hidden or 4 * self.emb_dim

    @property
    def family(self) -> Literal["gpt2", "llama", "qwen3"]:
        """The public architecture these switches make (for exports that must name it)."""
        if self.positions == "learned":
            return "gpt2"
        return "qwen3" if self.qk_norm else "llama"

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
        """The fields that differ from GPT-2's defaults, plus the shape: a GPT-2 config reads as it always has, and
        its stage keys and checkpoints do not change with fields added for other families."""
        changed = self.model_dump(exclude_defaults=True)
        return {k: v for k, v in self.model_dump().items() if k in _GPT2_FIELDS or k in changed}

    def n_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count of `GPTModel(self)` without building it."""
        e, v, layers = self.emb_dim, self.vocab_size, self.n_layers
        norm = 2 * e if self.norm == "layernorm" else e
        q, kv, h = self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden_dim
        attention = e * (q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0) + q * e + (e if self.bias else 0)
        attention += 2 * self.head_dim if self.qk_norm else 0
        up = 2 * h if self.mlp == "swiglu" else h
        mlp = e * up + h * e + ((up + e) if self.bias else 0)
        total = layers * (2 * norm + attention + mlp) + norm  # final norm
        positions = self.context_length * e if self.positions == "learned" else 0
        if include_embeddings:
            total += v * e + positions + (0 if self.tie_weights else v * e)
        elif not self.tie_weights:
            total += v * e
        return total


# The fields a GPT-2 config has always stored (`to_dict` keeps them even at their defaults).
_GPT2_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads", "dropout", "qkv_bias", "tie_weights")

# What the Llama family shares (no biases, RMSNorm, SwiGLU, rotary positions); Qwen3 adds q/k norm.
_LLAMA = dict(qkv_bias=False, bias=False, norm="rmsnorm", mlp="swiglu", positions="rope")

PRESETS: dict[str, GPTConfig] = {
    # The public GPT-2 checkpoints (Hugging Face openai-community/<name>).
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # CPU presets: `tiny` for tests, `mini` for `make run` (trains usefully on 2 CPU cores; times: docs/pipeline.md).
    "tiny": GPTConfig(context_length=128, emb_dim=64, n_layers=2, n_heads=2),
    "mini": GPTConfig(context_length=256, emb_dim=256, n_layers=4, n_heads=4),
    # The Llama family and Qwen3 at the shapes of the public checkpoints (`load-hf` reads the real config.json;
    # these name the shapes for benchmarks and from-scratch runs). Context is the model's, not a training window.
    "smollm-135m": GPTConfig(
        vocab_size=49152,
        context_length=2048,
        emb_dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        mlp_hidden=1536,
        **_LLAMA,
    ),
    "smollm2-135m": GPTConfig(
        vocab_size=49152,
        context_length=8192,
        emb_dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        mlp_hidden=1536,
        rope_theta=100000.0,
        **_LLAMA,
    ),
    "smollm2-360m": GPTConfig(
        vocab_size=49152,
        context_length=8192,
        emb_dim=960,
        n_layers=32,
        n_heads=15,
        n_kv_heads=5,
        mlp_hidden=2560,
        rope_theta=100000.0,
        **_LLAMA,
    ),
    "llama-3.2-1b": GPTConfig(
        vocab_size=128256,
        context_length=131072,
        emb_dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        mlp_hidden=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=8192),
        **_LLAMA,
    ),
    "qwen3-0.6b": GPTConfig(
        vocab_size=151936,
        context_length=40960,
        emb_dim=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_size=128,
        mlp_hidden=3072,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        qk_norm=True,
        **_LLAMA,
    ),
    # A Llama-family model that trains on 2 CPU cores from scratch (the GPT-2 `mini` budget, with GPT-2's BPE).
    "llama-mini": GPTConfig(
        context_length=256,
        emb_dim=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=688,
        **_LLAMA,
    ),
}


def _known_preset(name: str) -> str:
    if name not in PRESETS:  # a custom error: its message is ours alone, without pydantic's "Value error, "
        raise PydanticCustomError("unknown_preset", f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return name


# A preset name, checked when a config is made (a stage config's `preset: Preset = "mini"`).
Preset = Annotated[str, AfterValidator(_known_preset)]

# Hugging Face repository names of the public GPT-2 presets (their weights are fetched by preset name).
HF_NAMES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
}
