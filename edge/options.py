"""What `python -m edge generate` and `gptflow generate` share on their command lines: the generation options
and the rule for a prompt longer than the context. Standard library only, so the `gptflow` command's start-up
does not pay for NumPy or tiktoken."""

from __future__ import annotations

import argparse
import math


class PromptTooLong(ValueError):
    """A prompt has more tokens than the model's context (and truncation was not asked for)."""


def fit_context(ids: list[int], context_length: int, truncate: bool = False) -> list[int]:
    """A prompt's token ids if they fit the context; else an error, or with `truncate` their last
    `context_length` tokens."""
    if len(ids) <= context_length:
        return ids
    if not truncate:
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens; the model's context is {context_length} "
            "(shorten it, or pass --truncate to keep its last tokens)"
        )
    return ids[-context_length:]


def _bounded(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a number of `kind` in [low, high] (or (low, high] with `low_open`), else argparse's one-line
    error naming the option."""
    expected = f"{'an integer' if kind is int else 'a number'} {'>' if low_open else '>='} {low}"
    expected += f" and <= {high}" if high is not None else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value):  # NaN passes every comparison below; infinity is no setting either
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def positive_int(text: str) -> int:
    """An argparse type: a flag's value must be an integer of at least 1 (threads, counts)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_generation_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options `python -m edge generate` and `gptflow generate` share, with one name and meaning each."""
    parser.add_argument("--input", default="", help="the instruction's input text (Alpaca's `### Input:`)")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="no prompt template (neither the fine-tuning template nor the model's chat template): continue the text "
        "as it is",
    )
    parser.add_argument("--max-new-tokens", type=_bounded(int, 1), default=max_new_tokens)
    parser.add_argument(
        "--temperature", type=_bounded(float, 0.0), default=0.0, help="0: greedy (default); > 0 samples"
    )
    parser.add_argument("--top-k", type=_bounded(int, 1), help="sample from the k most likely tokens only")
    parser.add_argument(
        "--top-p",
        type=_bounded(float, 0.0, 1.0, low_open=True),
        help="sample from the smallest set of tokens holding this probability (0 < p <= 1)",
    )
    parser.add_argument("--seed", type=int, help="seed of the sampling")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false", help="recompute without the KV cache")
    parser.add_argument(
        "--truncate", action="store_true", help="keep the last tokens of a prompt longer than the context"
    )
