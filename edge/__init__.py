"""Edge inference for exported classifiers: onnxruntime, NumPy and tiktoken only (never torch).

    python -m edge BUNDLE "text" ["text" ...] [--int8]
"""

from edge.runtime import BundleError, EdgeClassifier, verify_bundle

__all__ = ["BundleError", "EdgeClassifier", "verify_bundle"]
