"""`python -m edge BUNDLE "text" ["text" ...] [--int8]`: label and probability per text, one per line."""

from __future__ import annotations

import argparse
import sys

from edge import BundleError
from edge.runtime import EdgeClassifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge",
        description="Classify texts with an exported bundle "
        "(onnxruntime only; the bundle's hashes are verified first).",
    )
    parser.add_argument("bundle", help="bundle folder written by `gptflow export`")
    parser.add_argument("texts", nargs="+", metavar="TEXT")
    parser.add_argument("--int8", action="store_true", help="use model.int8.onnx")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    try:
        classifier = EdgeClassifier(args.bundle, int8=args.int8, threads=args.threads)
    except BundleError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return 2
    for text, (label, prob) in zip(args.texts, classifier.predict(args.texts)):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
