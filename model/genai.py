"""The files onnxruntime-genai reads beside our exported decoder: genai_config.json and a Hugging Face tokenizer.

Facts from onnxruntime-genai's source (github.com/microsoft/onnxruntime-genai, main at 0.16-dev; file paths below),
each checked by running the 0.18.0 wheel (tests/test_genai.py):

- `model.type` is "decoder", not "gpt2". "gpt2" selects `Gpt_Model` (src/models/model.cpp, `CreateModel`),
  whose state holds a `CombinedKeyValueCache` (src/models/gpt.h): one input `past_%d` per layer shaped
  (2, batch, heads, past, head_dim), keys and values stacked. Our graph has separate
  `past_key_values.{i}.key` / `.value` inputs, which is what every other LLM type reads:
  `DecoderOnly_Model` with `DefaultKeyValueCache` (src/models/kv_cache.cpp). "decoder" is the generic member of
  `ModelType::IsLLM` (src/models/model_type.h) and carries no model-specific behaviour.
- The input/output names are genai's defaults (`Config::Defaults` in src/config.h): input_ids, attention_mask,
  position_ids, past_key_values.%d.key/value, logits, present.%d.key/value. We still write them out, so that
  the config documents the graph and a rename on either side fails loudly.
- `search.past_present_share_buffer` false: genai then feeds a zero-length past on the prompt pass and
  each step's presents as the next pasts (`DefaultKeyValueCache::Update`), exactly our graph's contract. True
  would hand the graph max_length-long buffers it must update in place (a different graph).
- Position ids and attention mask are genai's, never ours: it has no API to pass them for an LLM
  (`Generator::SetInputs` throws "SetInputs is not supported for this model type" for `ModelType::IsLLM`,
  src/generators.cpp; `set_model_input("attention_mask")`
  only adds a second input of that name, which breaks the next step). Batch 1 gets positions 0..n-1 and an
  all-ones mask, then +1 / one more 1 per step (`DefaultPositionInputs`, src/models/position_inputs.cpp;
  `UpdatePositionIds` / `UpdateAttentionMask` in src/cpu/interface.cpp) -- our graph's contract exactly.
  A batch > 1 is NOT left-padding aware in the 0.18.0 wheel: every row gets the all-ones mask and positions
  0..n-1 even where its tokens are pad_token_id (seen with `og.set_log_options(model_input_values=True)`).
  The main-branch source (0.16-dev) instead masks leading pad_token_id tokens and gives real tokens their
  column index as position; neither is Hugging Face's rule (real tokens counted from 0). So genai serves
  batch 1 and batches of equal-length prompts; prompts of different lengths need one generator each.
- `search.max_length` (prompt + new tokens) defaults to `context_length` when 0 (src/config.cpp). Our graph
  has learned positions for `context_length` tokens only, so it must never exceed that; genai does not slide
  the window, it stops at max_length.
- The tokenizer is onnxruntime-extensions' C++ port of Hugging Face tokenizers: it reads `tokenizer.json`
  (the algorithm: BPE model, ByteLevel pre-tokenizer and decoder) and `tokenizer_config.json` (must exist; its
  `tokenizer_class` changed nothing in our checks, we write GPT2Tokenizer's for Hugging Face's sake) from the
  model folder. It does not read encoder.json / vocab.bpe, hence `hf_tokenizer_json`. Decoding skips the
  special `<|endoftext|>` (as Hugging Face's skip_special_tokens does), unlike tiktoken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge.text import ENDOFTEXT, EOT_ID
from model.config import GPTConfig

GENAI_CONFIG = "genai_config.json"


def genai_config(
    cfg: GPTConfig,
    *,
    model_file: str = "model.onnx",
    eos_id: int = EOT_ID,
    pad_id: int = EOT_ID,
    bos_id: int = EOT_ID,
) -> dict[str, Any]:
    """genai_config.json for our decoder graph (see the module docstring for why each value)."""
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.context_length,
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": cfg.emb_dim,
                "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.n_heads,  # no grouped-query attention: one KV head per head
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


def genai_files(cfg: GPTConfig, tokenizer_files: tuple[Path, Path], model_file: str = "model.onnx") -> dict[str, Any]:
    """genai_config.json, tokenizer.json and tokenizer_config.json (name -> JSON content) for a folder that holds
    the decoder as `model_file`."""
    return {
        GENAI_CONFIG: genai_config(cfg, model_file=model_file),
        "tokenizer.json": hf_tokenizer_json(*tokenizer_files),
        "tokenizer_config.json": tokenizer_config(cfg.context_length),
    }
