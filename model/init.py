"""Where a fine-tune starts: `random` (a preset), `gpt2:<preset-or-path>` (public GPT-2 weights) or
`checkpoint:<path>` (our pretraining or `load-gpt2` output). Shared by the classifier and instruction tunes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptflow.errors import GptflowError
from gptflow.settings import Settings
from gptflow.storage import sha256_file
from model.checkpoint import load_model
from model.config import GPTConfig
from model.gpt import GPTModel

MODEL_FILE = "model.pt"  # what pretraining and load-gpt2 write into their folders
INIT_HELP = "random | gpt2:<preset-or-safetensors> | checkpoint:<path> (our pretraining or load-gpt2 output)"


class InitSpecError(GptflowError, ValueError):
    """An init spec is malformed or names a checkpoint that does not exist."""


def validate_init(value: str) -> str:
    """Pydantic validator body for an `init` field."""
    kind, sep, ref = value.partition(":")
    if value == "random" or (sep and kind in ("checkpoint", "gpt2") and ref.strip()):
        return value
    raise ValueError(f"expected {INIT_HELP}, got {value!r}")


def init_label(init: str, preset: str) -> str:
    """Short name of the starting point, for folder names."""
    if init == "random":
        return preset
    path = Path(init.partition(":")[2])
    if path.name in (MODEL_FILE, "model.safetensors"):
        return path.parent.name
    return path.stem if path.suffix in (".pt", ".safetensors") else path.name


def init_digest(init: str, settings: Settings | None = None) -> str:
    """What `init` holds, for output-folder keys: "random", or the sha256 of its weights file. A path alone
    is not enough: a rerun upstream stage may rewrite the same file."""
    path = init_file(init, settings)
    return "random" if path is None else sha256_file(path)


def init_file(init: str, settings: Settings | None = None) -> Path | None:
    """The local weights file behind `init` (None for random); GPT-2 weights named by preset are fetched."""
    kind, _, ref = init.partition(":")
    if kind == "random":
        return None
    if kind == "checkpoint":
        path = Path(ref).expanduser()
        path = path / MODEL_FILE if path.is_dir() else path
        if not path.is_file():
            raise InitSpecError(f"init checkpoint:{ref}: no such checkpoint (expected a gptflow .pt file or a "
                                f"folder with {MODEL_FILE}, e.g. a pretraining output)")
        return path
    from model.weights import resolve_weights

    return resolve_weights(ref, settings)[0]


def build_init_model(init: str, preset: str, *, dropout: float = 0.0, seed: int = 0,
                     context_length: int | None = None, settings: Settings | None = None) -> GPTModel:
    """The starting model with the requested dropout (seeded when random)."""
    kind, _, ref = init.partition(":")
    if kind == "random":
        overrides: dict[str, Any] = {"dropout": dropout}
        if context_length is not None:
            overrides["context_length"] = context_length
        torch.manual_seed(seed)
        return GPTModel(GPTConfig.from_preset(preset, **overrides))
    if kind == "gpt2":
        from model.weights import load_gpt2

        return load_gpt2(ref, settings, dropout=dropout)[0]
    loaded, cfg = load_model(init_file(init, settings))
    model = GPTModel(cfg.model_copy(update={"dropout": dropout}))
    model.load_state_dict(loaded.state_dict())
    return model
