"""Edge inference for exported bundles: onnxruntime, NumPy and the tokenizer package the bundle needs (tiktoken,
or tokenizers for a model with its own vocabulary; its chat template comes rendered in the bundle) only.

    python -m edge classify BUNDLE "text" ["text" ...] [--int8]
    python -m edge generate BUNDLE "instruction" [--input TEXT] [--int8] [--max-new-tokens N] ...

A leaf: it imports nothing of this project, so the folder copied alone beside a bundle runs on a device.
"""

import hashlib
from pathlib import Path

import numpy as np


def sha256_file(path: str | Path) -> str:
    """The one file hash of the project (gptflow.storage uses it too)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class BundleError(ValueError):
    """The bundle is incomplete, altered since export, or not an edge bundle."""


class NonFiniteOutputError(BundleError):
    """A model gave NaN or infinite logits: its weights are broken, so no label, probability or token is shown."""


def finite_logits(logits: np.ndarray, model: str | Path) -> np.ndarray:
    """`logits` (one row per input), or NonFiniteOutputError naming `model` when any row holds NaN or infinity."""
    bad = int((~np.isfinite(logits)).reshape(len(logits), -1).any(axis=1).sum())
    if bad:
        raise NonFiniteOutputError(
            f"{model} gives NaN or infinite logits for {bad} of {len(logits)} inputs: the model is broken; "
            "retrain it, or export it again from a checkpoint with finite weights"
        )
    return logits
