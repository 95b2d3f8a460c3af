"""Checkpoints: atomic `torch.save`, and loading with `weights_only=True` only (plain containers and
tensors; configs are stored as dicts and RNG states as tensors/lists, so nothing arbitrary is unpickled).

Our model checkpoint layout: {"format": FORMAT, "config": GPTConfig dict, "model": state_dict, ...}.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from gptflow.storage import atomic_path
from model import lora
from model.config import GPTConfig
from model.files import CheckpointError, check_torch_archive
from model.gpt import GPTModel

FORMAT = "gptflow-gpt/1"


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    """Write `state` to `path` atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """`mmap`: map the file instead of reading it, so tensors are read only when used (cheap to look at a
    checkpoint's plain fields)."""
    path = Path(path)
    check_torch_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or foreign archive raises, the message is ours
        raise CheckpointError(
            f"cannot load checkpoint {path} with weights_only=True (a gptflow checkpoint holds only tensors "
            f"and plain values): {_reason(exc)}"
        ) from None


def check_finite_weights(tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights that hold NaN or infinity, naming the file and the tensors: a model read from them would
    classify and generate from NaN logits, and every gate downstream would be measuring garbage."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not _finite(t)]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{path}: weights hold NaN or infinity ({shown}); the model is broken: retrain it")


def _finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: min and max carry NaN and infinity through, at the speed of a sum and
    without a mask the size of the tensor (40x faster than `isfinite(t).all()` on the CPU)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(low) and math.isfinite(high)


def _reason(exc: Exception) -> str:
    """The line of a loading error that says what is wrong; PyTorch's advice to load with weights_only=False (which
    runs arbitrary code from the file) is never passed on."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    unpickler = [line for line in lines if "WeightsUnpickler error" in line]
    if unpickler:
        return unpickler[0]
    if lines and "weights_only" not in lines[0]:
        return lines[0]
    return type(exc).__name__


def save_model(path: str | Path, model: GPTModel, **extra: Any) -> Path:
    """A model-only checkpoint in our format (what `load-gpt2` writes and `generate` reads); a LoRA model's holds
    its adapters and the base they adapt (model.lora)."""
    fields = lora.weights_fields(model)
    config = model.cfg.to_dict()
    if "lora" in fields:
        config = lora.merged_config(config, fields["lora"])
    return save_checkpoint(path, format=FORMAT, config=config, **fields, **extra)


def model_from_state(
    state: dict[str, Any], path: str | Path, *, merged: bool = True, settings=None
) -> tuple[GPTModel, GPTConfig]:
    """The `GPTModel` (on the CPU) of a loaded checkpoint; `path` names it in errors. A LoRA checkpoint's is its base
    with the adapters, merged into plain weights unless `merged` is False."""
    if state.get("format") != FORMAT or "config" not in state or "model" not in state:
        raise CheckpointError(
            f"{path} is not a gptflow model checkpoint (expected format {FORMAT!r} with 'config' and 'model'); "
            "convert Hugging Face weights with `gptflow load-gpt2`"
        )
    check_finite_weights(state["model"], path)
    if "lora" in state:
        model = lora.restore(lora.base_language_model(state, path, settings), state, path)
        if merged:
            lora.merge(model)
        return model, model.cfg
    cfg = GPTConfig.from_dict(state["config"])
    model = GPTModel(cfg)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the stored config: missing {missing}, unexpected {unexpected}"
        )
    return model, cfg


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (and the current GPU's, where CUDA is in use) in a form
    `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state(legacy=False)
    cuda = {"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() and torch.cuda.is_initialized() else {}
    return {
        **cuda,
        "python": _to_lists(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():  # a CPU run resumed from a GPU checkpoint has no GPU RNG
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
