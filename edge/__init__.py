"""Edge inference for exported classifiers: onnxruntime, NumPy and tiktoken only.

    python -m edge BUNDLE "text" ["text" ...] [--int8]

A leaf: it imports nothing of this project, so the folder copied alone beside a bundle runs on a device.
"""


class BundleError(ValueError):
    """The bundle is incomplete, altered since export, or not an edge bundle."""
