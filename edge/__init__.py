"""Edge inference for exported bundles: onnxruntime, NumPy and tiktoken only.

    python -m edge classify BUNDLE "text" ["text" ...] [--int8]
    python -m edge generate BUNDLE "instruction" [--input TEXT] [--int8] [--max-new-tokens N] ...

A leaf: it imports nothing of this project, so the folder copied alone beside a bundle runs on a device.
"""

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """The one file hash of the project (gptflow.storage uses it too)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class BundleError(ValueError):
    """The bundle is incomplete, altered since export, or not an edge bundle."""
