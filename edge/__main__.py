"""`python -m edge classify BUNDLE TEXT...` and `python -m edge generate BUNDLE "instruction"`.

Bundle hashes are verified before anything is loaded; errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from edge import BundleError
from edge.options import add_generation_options, positive_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge", description="Run an exported bundle with onnxruntime alone (hashes verified first)."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("classify", help="label texts with a classifier bundle (label, probability, text per line)")
    p.add_argument("bundle", help="bundle folder written by `gptflow export`")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--int8", action="store_true", help="use model.int8.onnx")
    p.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads")
    p.set_defaults(handler=classify)

    p = verbs.add_parser(
        "generate",
        help="answer instructions with a language-model bundle",
        description="The bundle's prompt template (Alpaca or Phi-3) is applied, else the model's own chat template "
        "when it has one; generation stops at any of the model's end tokens; greedy unless --temperature > 0. "
        "One instruction streams its answer as it is produced; several are answered as one left-padded batch.",
    )
    p.add_argument("bundle", help="language-model bundle folder written by `gptflow export`")
    p.add_argument("instructions", nargs="+", metavar="INSTRUCTION")
    add_generation_options(p, max_new_tokens=256)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None, help="default: on for one prompt")
    p.add_argument("--int8", action="store_true", help="use model.int8.onnx")
    p.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads")
    p.set_defaults(handler=generate)

    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (BundleError, ValueError) as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return 2


def classify(args: argparse.Namespace) -> int:
    from edge.runtime import EdgeClassifier

    classifier = EdgeClassifier(args.bundle, int8=args.int8, threads=args.threads)
    for text, (label, prob) in zip(args.texts, classifier.predict(args.texts)):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0


def generate(args: argparse.Namespace) -> int:
    from edge.lm import EdgeGenerator

    generator = EdgeGenerator(args.bundle, int8=args.int8, threads=args.threads)
    prompts = [
        generator.instruction_ids(text, args.input, raw=args.raw, truncate=args.truncate) for text in args.instructions
    ]
    stream = len(prompts) == 1 if args.stream is None else args.stream
    if stream and len(prompts) > 1:
        raise ValueError("--stream shows one answer as it is produced: give one instruction")

    def write(_row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    answers = generator.generate(
        prompts,
        args.max_new_tokens,
        on_text=write if stream else None,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=args.use_cache,
    )
    if stream:
        sys.stdout.write("\n")
    else:
        for instruction, answer in zip(args.instructions, answers):
            sys.stdout.write(f"### {instruction}\n{answer}\n" if len(answers) > 1 else f"{answer}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
