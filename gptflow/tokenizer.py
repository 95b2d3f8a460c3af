"""The GPT-2 tokenizer from `encoder.json` + `vocab.bpe` fetched through the download layer.

The encoding itself is built by `edge.text` (the edge runtime builds it standalone from a bundle's copies).
"""

from __future__ import annotations

from pathlib import Path

import tiktoken

from edge.text import ENDOFTEXT, EOT_ID, VOCAB_SIZE, load_gpt2_encoding

__all__ = ["ENDOFTEXT", "EOT_ID", "VOCAB_SIZE", "encode", "get_tokenizer", "tokenizer_files"]


def tokenizer_files(settings=None) -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe), fetched through the download layer."""
    from gptflow.download import fetch_source

    return fetch_source("gpt2-encoder", settings), fetch_source("gpt2-vocab", settings)


def get_tokenizer(settings=None) -> tiktoken.Encoding:
    """The GPT-2 tokenizer, built once per process from mirrored or downloaded files."""
    return load_gpt2_encoding(*tokenizer_files(settings))


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Encode text, letting `<|endoftext|>` through as the special token 50256."""
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})
