"""The GPT-2 encoding and text -> padded token batches, shared by training and the edge runtime.

NumPy and tiktoken only (a model with its own vocabulary passes its `edge.hf_tokenizer.HFTokenizer`). tiktoken's
own `get_encoding("gpt2")` downloads `encoder.json` + `vocab.bpe`; here they come from the download layer
(mirror-aware, hash-checked) or from an edge bundle. One definition of the input encoding means the exported model
sees exactly the tokens it was trained on: first `max_length` tokens, an empty text read as one end token
(GPT-2's `<|endoftext|>`), right padding with the pad id (the model reads the last real token, so padding never
reaches it through causal attention).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import tiktoken

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
PAD_ID = EOT_ID  # as in the book
VOCAB_SIZE = 50257
ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# The r50k/gpt2 pre-tokenization pattern (tiktoken_ext.openai_public.gpt2).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=4)
def load_gpt2_encoding(encoder_json: str | Path, vocab_bpe: str | Path) -> "tiktoken.Encoding":
    """Build tiktoken's GPT-2 encoding from local files; tiktoken checks both sha256 values. tiktoken is imported
    here, not with the module: a bundle with its own tokenizer runs without it."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

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


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to the first `max_length`; never empty (an empty text reads as the end token).

    `tokenizer`: tiktoken's GPT-2 encoding, or anything with the interface of `edge.hf_tokenizer.HFTokenizer`
    (`encode_batch`, `eos_id`): GPT-2's BPE behind it gives the same ids as tiktoken, a Hugging Face tokenizer
    encodes as `tokenizer(text)` does in transformers, its post-processor's tokens included (Llama 3's bos)."""
    if type(tokenizer).__module__.startswith("tiktoken"):
        ids, empty = tokenizer.encode_batch(list(texts), allowed_special={ENDOFTEXT}), PAD_ID
    else:
        ids = tokenizer.encode_batch(list(texts), add_special_tokens=True)
        empty = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id
    return [(row[:max_length] or [empty]) for row in ids]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 (B, longest row): right padding, mask 1 on real tokens."""
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
