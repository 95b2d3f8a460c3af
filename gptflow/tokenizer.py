"""The GPT-2 tokenizer from `encoder.json` + `vocab.bpe` fetched through the download layer.

The encoding itself is built by `edge.text` (the edge runtime builds it standalone from a bundle's copies).
"""

from __future__ import annotations

from pathlib import Path

import tiktoken

from edge.text import ENDOFTEXT, EOT_ID, VOCAB_SIZE, load_gpt2_encoding

__all__ = [
    "ENDOFTEXT",
    "EOT_ID",
    "VOCAB_SIZE",
    "GPT2Text",
    "encode",
    "get_tokenizer",
    "model_tokenizer",
    "tokenizer_files",
]


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


class GPT2Text:
    """GPT-2's BPE (tiktoken) behind the interface of `edge.hf_tokenizer.HFTokenizer`, so that a verb reads any
    model's text the same way: GPT-2 has no start token, one end token, and no chat template."""

    bos_id = None
    eos_id = EOT_ID
    eos_ids = [EOT_ID]
    pad_id = EOT_ID
    eos_token = ENDOFTEXT
    chat_template = None
    files = None
    generation_config: dict = {}  # GPT-2 ships none: greedy

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return encode(self.encoding, text)

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return self.encoding.encode_batch(list(texts), allowed_special={ENDOFTEXT})

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i != EOT_ID]
        return self.encoding.decode(ids)


def model_tokenizer(files: dict[str, str] | None, settings=None):
    """The tokenizer a model was trained with: the Hugging Face tokenizer whose files a checkpoint stores, or GPT-2's
    BPE for a checkpoint that stores none (every model whose vocabulary is GPT-2's)."""
    if files is None:
        return GPT2Text(get_tokenizer(settings))
    from gptflow.chat_template import ChatTokenizer

    return ChatTokenizer.from_files(files)
