"""Text -> padded token batches, shared by training (model/classifier.py) and the edge runtime.

NumPy and tiktoken only. One definition of the input encoding means the exported model sees exactly the
tokens it was trained on: first `max_length` GPT-2 tokens, an empty text read as one `<|endoftext|>`,
right padding with the pad id (the model reads the last real token, so padding never reaches it through
causal attention).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD_ID = 50256  # <|endoftext|>, as in the book
ENDOFTEXT = "<|endoftext|>"


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to the first `max_length`; never empty."""
    ids = tokenizer.encode_batch(list(texts), allowed_special={ENDOFTEXT})
    return [(row[:max_length] or [PAD_ID]) for row in ids]


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
