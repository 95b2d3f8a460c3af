"""What `python -m edge generate` and `gptflow generate` share on their command lines: the generation options
and the rule for a prompt longer than the context. Standard library only, so the `gptflow` command's start-up
does not pay for NumPy or tiktoken."""

from __future__ import annotations

import argparse


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


def add_generation_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options `python -m edge generate` and `gptflow generate` share, with one name and meaning each."""
    parser.add_argument("--input", default="", help="the instruction's input text (Alpaca's `### Input:`)")
    parser.add_argument("--raw", action="store_true", help="no prompt template: continue the text as it is")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this probability")
    parser.add_argument("--seed", type=int, help="seed of the sampling")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false", help="recompute without the KV cache")
    parser.add_argument(
        "--truncate", action="store_true", help="keep the last tokens of a prompt longer than the context"
    )
