"""The files onnxruntime-genai reads beside our exported decoder: genai_config.json and a Hugging Face tokenizer.

The model type is the family's: "llama" and "qwen3" (genai's `DecoderOnly_Model` for both; the rotary positions
are computed inside our graph from `position_ids`, so the config carries no rope parameters, as genai's own
builder writes none), and "decoder" for the GPT-2 architecture, not "gpt2": genai's gpt2 type expects one combined
past per layer, our graph has separate `past_key_values.{i}.key|value` inputs. The cache is grouped-query:
`num_key_value_heads` key/value heads per layer. genai sets positions and the attention mask itself and does not
mask left padding (0.18), so it serves batch 1 and equal-length prompts. Its tokenizer reads tokenizer.json and
tokenizer_config.json: the model's own files, or for GPT-2's vocabulary ones written here from encoder.json /
vocab.bpe. The source walk behind each value: docs/design-notes.md, "onnxruntime-genai".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from edge.text import ENDOFTEXT, EOT_ID
from model.config import GPTConfig

GENAI_CONFIG = "genai_config.json"
# Our config's family -> genai's model type (src/models/model_type.h of onnxruntime-genai 0.18).
GENAI_TYPES = {"gpt2": "decoder", "llama": "llama", "qwen3": "qwen3"}


def genai_config(
    cfg: GPTConfig,
    *,
    model_file: str = "model.onnx",
    eos_id: int | Sequence[int] = EOT_ID,
    pad_id: int = EOT_ID,
    bos_id: int = EOT_ID,
) -> dict[str, Any]:
    """genai_config.json for our decoder graph (docs/design-notes.md says why each value). `eos_id`: one id, or every
    id generation stops on (genai takes a list: Llama 3's three, Qwen3's two)."""
    eos = eos_id if isinstance(eos_id, int) else list(eos_id)
    return {
        "model": {
            "type": GENAI_TYPES[cfg.family],
            "bos_token_id": bos_id,
            "eos_token_id": eos[0] if isinstance(eos, list) and len(eos) == 1 else eos,
            "pad_token_id": pad_id,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.context_length,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": cfg.emb_dim,
                "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.kv_heads,  # the cache holds these heads only (grouped-query attention)
                "num_hidden_layers": cfg.n_layers,
                "head_size": cfg.head_dim,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "min_length": 0,
            "max_length": cfg.context_length,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,  # genai's and Hugging Face's defaults; greedy ignores them (do_sample false)
            "top_p": 1.0,
        },
    }


def _special_token(token_id: int) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": ENDOFTEXT,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def hf_tokenizer_json(encoder_json: Path, vocab_bpe: Path) -> dict[str, Any]:
    """GPT-2's byte-level BPE as a Hugging Face `tokenizers` tokenizer.json, from OpenAI's two files.

    encoder.json already maps byte-level strings (the GPT-2 byte-to-unicode alphabet) to ids, which is the
    `vocab` of a BPE model; vocab.bpe lists the merges in rank order after a `#version` header line. No prefix
    space (GPT-2 and tiktoken encode "Hello" as 15496), and `<|endoftext|>` is an added special token so
    it encodes to 50256 rather than being split.
    """
    vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_special_token(vocab[ENDOFTEXT])],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(context_length: int) -> dict[str, Any]:
    """tokenizer_config.json: GPT2Tokenizer, no BOS added, `<|endoftext|>` as bos/eos/unk, no space clean-up
    on decode (so decoding matches tiktoken)."""
    special = _special_token(EOT_ID)
    del special["id"]
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(EOT_ID): special},
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": context_length,
    }


def genai_files(
    cfg: GPTConfig,
    tokenizer_files: tuple[Path, Path] | None,
    model_file: str = "model.onnx",
    *,
    hf_tokenizer: Any = None,
) -> dict[str, Any]:
    """The files genai needs beside the decoder `model_file` (name -> JSON content, or text).

    GPT-2's vocabulary (`tokenizer_files` = encoder.json, vocab.bpe): genai_config.json, tokenizer.json and
    tokenizer_config.json written here. A model with its own tokenizer (`hf_tokenizer`, an
    `edge.hf_tokenizer.HFTokenizer`): genai_config.json with its bos/eos/pad ids, and the tokenizer's own files as
    they are (genai's tokenizer needs tokenizer_config.json: a minimal one when the model came without)."""
    if hf_tokenizer is None:
        if tokenizer_files is None:
            raise ValueError("genai_files: give GPT-2's tokenizer files or the model's Hugging Face tokenizer")
        return {
            GENAI_CONFIG: genai_config(cfg, model_file=model_file),
            "tokenizer.json": hf_tokenizer_json(*tokenizer_files),
            "tokenizer_config.json": tokenizer_config(cfg.context_length),
        }
    eos_ids = hf_tokenizer.eos_ids
    if not eos_ids:
        raise ValueError("the model's tokenizer names no end-of-sequence token: generation could never stop")
    pad = hf_tokenizer.pad_id if hf_tokenizer.pad_id is not None else eos_ids[0]
    bos = hf_tokenizer.bos_id if hf_tokenizer.bos_id is not None else eos_ids[0]
    files: dict[str, Any] = {
        GENAI_CONFIG: genai_config(cfg, model_file=model_file, eos_id=eos_ids, pad_id=pad, bos_id=bos)
    }
    texts = hf_tokenizer.files
    files.update({name: text for name, text in texts.items() if "/" not in name})
    if "tokenizer_config.json" not in texts:
        files["tokenizer_config.json"] = {"model_max_length": cfg.context_length}
    return files
