"""The GPT-2 BPE tokenizer, built by tiktoken from `encoder.json` + `vocab.bpe` files we verified ourselves.

tiktoken's own `get_encoding("gpt2")` downloads these files from the internet; here they come through the
download layer (mirror-aware, hash-checked) or from an edge bundle. Torch-free: the edge runtime uses it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# The r50k/gpt2 pre-tokenization pattern (tiktoken_ext.openai_public.gpt2).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=4)
def load_gpt2_encoding(encoder_json: str | Path, vocab_bpe: str | Path) -> tiktoken.Encoding:
    """Build tiktoken's GPT-2 encoding from local files; tiktoken checks both sha256 values."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def tokenizer_files(settings=None) -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe), fetched through the download layer."""
    from gptflow.download import fetch_source

    return fetch_source("gpt2-encoder", settings), fetch_source("gpt2-vocab", settings)


def get_tokenizer(settings=None) -> tiktoken.Encoding:
    """The GPT-2 tokenizer, built once per process from mirrored or downloaded files."""
    encoder_json, vocab_bpe = tokenizer_files(settings)
    return load_gpt2_encoding(encoder_json, vocab_bpe)


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Encode text, letting `<|endoftext|>` through as the special token 50256."""
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})
