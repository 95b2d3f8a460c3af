"""A language model of any family as one GGUF file, the format llama.cpp and Ollama run (`gguf`, the writer that
llama.cpp itself publishes, does the file format and the Q8_0/Q4_0 block quantization).

What llama.cpp's loader reads, per architecture (its `src/models/<arch>.cpp`, and `convert_hf_to_gguf.py` for the
conventions a converted model follows):
- `gpt2`: learned positions, LayerNorm, GELU, one fused `attn_qkv` per block and a bias on every linear layer and
  norm; our GPT-2 without query/key/value biases (the book's default) gets zero ones.
- `llama`: llama.cpp rotates pairs of adjacent dimensions, Hugging Face (and we) rotate the two halves of each
  head, so the query and key rows are permuted as `convert_hf_to_gguf.py` does; Llama 3's frequency stretch is a
  `rope_freqs` tensor of per-frequency divisors.
- `qwen3`: halves rotated as we do (no permutation), RMSNorm on queries and keys, its own head size.
A tied head is stored once (llama.cpp reads `token_embd` as the output when `output` is absent).

Types follow the converter: norms, biases, position tables and rotary factors stay F32; other matrices take the
chosen type, and a matrix whose rows do not split into 32-value blocks falls back to F16. K-quants cannot be
written from Python, so where llama.cpp's `llama-quantize` gives Q4_0's output head Q6_K, ours is Q8_0.

The vocabulary is written as llama.cpp's BPE reads it (`tokenizer.ggml.model` "gpt2"): byte-level tokens, merges,
token types (special tokens CONTROL, other added ones USER_DEFINED, padding rows UNUSED) and the pre-tokenizer's
name, read off the tokenizer's structure (`pre_tokenizer_name`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from model.config import GPTConfig
from model.gpt import GPTModel
from model.onnx_export import ExportError

QUANTS = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
T = gguf.TokenType

# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp) and the split each one performs, as tokenizer.json writes
# it. GPT-2's and SmolLM's are ByteLevel's own regex (SmolLM splits digits first); the others a Split regex.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEXES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as GGUF's keys hold it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None


def gpt2_vocabulary(encoder_json: Path, vocab_bpe: Path, vocab_size: int, chat_template: str | None) -> Vocabulary:
    """GPT-2's BPE from its two files: byte-level tokens by id, `<|endoftext|>` a control token."""
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    merges = [line for line in Path(vocab_bpe).read_text(encoding="utf-8").splitlines()[1:] if line]
    by_id = {i: token for token, i in encoder.items()}
    eot = encoder["<|endoftext|>"]
    tokens, types = _padded(by_id, {eot: T.CONTROL}, vocab_size)
    return Vocabulary(tokens, types, merges, "gpt-2", eot, eot, eot, False, chat_template)


def hf_vocabulary(tokenizer: Any, vocab_size: int, chat_template: str | None) -> Vocabulary:
    """A Hugging Face byte-level BPE (`edge.hf_tokenizer.HFTokenizer`) from its tokenizer.json: the model's vocab,
    then its added tokens (special ones CONTROL, others USER_DEFINED)."""
    spec = json.loads(tokenizer.files["tokenizer.json"])
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM); this tokenizer.json has "
            f"model {model.get('type')!r} and decoder {(spec.get('decoder') or {}).get('type')!r}"
        )
    by_id = {i: token for token, i in model["vocab"].items()}
    kinds = {}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = T.CONTROL if added.get("special") else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tokens, types = _padded(by_id, kinds, vocab_size)
    # A post-processor that starts every sequence with the start token (Llama 3's TemplateProcessing) means the
    # model expects it; llama.cpp adds it when add_bos_token says so.
    bos = tokenizer.bos_id
    add_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    return Vocabulary(tokens, types, merges, pre, bos, tokenizer.eos_id, tokenizer.pad_id, add_bos, chat_template)


def _padded(by_id: dict[int, str], kinds: dict[int, int], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and types for ids 0..vocab_size-1; ids the tokenizer lacks (an embedding padded past it) are UNUSED
    `[PADn]` rows, as llama.cpp's converter writes them."""
    beyond = sorted(i for i in by_id if i >= vocab_size)
    if beyond:
        raise ExportError(f"the tokenizer has token ids up to {beyond[-1]} but the model's vocabulary is {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, T.NORMAL) if i in by_id else T.UNUSED for i in range(vocab_size)]
    return tokens, types


def pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for the pre-tokenizer tokenizer.json describes (an ExportError naming it otherwise: a wrong
    name would split text differently and the model would read other token ids)."""
    steps = (spec.get("pretokenizers") if spec and spec.get("type") == "Sequence" else [spec]) or []
    kinds = [step.get("type") if step else None for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_REGEXES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name
    raise ExportError(
        f"no llama.cpp pre-tokenizer matches this tokenizer's ({' + '.join(map(str, kinds))}): GGUF export knows "
        "GPT-2's, SmolLM's, Llama 3's and Qwen's"
    )


# ------------------------------------------------------------------------------------------------ tensors


def permute_rotary(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Query or key rows from rotate-half order (each head's first half, then second half) to llama.cpp's
    interleaved pairs: `convert_hf_to_gguf.py`'s `LlamaModel.permute`."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(model: GPTModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in the layout llama.cpp reads) for every tensor of the file, in file order."""
    cfg = model.cfg
    p = {name: t.detach().to("cpu", torch.float32) for name, t in model.named_parameters(remove_duplicate=False)}
    gpt2 = cfg.family == "gpt2"
    yield "token_embd.weight", p["tok_emb.weight"]
    if gpt2:
        yield "position_embd.weight", p["pos_emb.weight"]
    if cfg.rope_scaling is not None:
        yield "rope_freqs.weight", rope_divisors(cfg)
    yield "output_norm.weight", p["final_norm.weight"]
    if gpt2:
        yield "output_norm.bias", p["final_norm.bias"]
    if not cfg.tie_weights:
        yield "output.weight", p["out_head.weight"]
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        ours, blk = f"blocks.{i}.", f"blk.{i}."
        zeros = lambda n: torch.zeros(n)  # noqa: E731  (a bias llama.cpp requires and our layer lacks)
        bias = lambda name, n: p.get(ours + name, zeros(n))  # noqa: E731
        yield blk + "attn_norm.weight", p[ours + "norm1.weight"]
        if gpt2:
            yield blk + "attn_norm.bias", p[ours + "norm1.bias"]
            yield blk + "attn_qkv.weight", p[ours + "attn.qkv.weight"]
            yield blk + "attn_qkv.bias", bias("attn.qkv.bias", q + 2 * kv)
        else:
            wq, wk, wv = p[ours + "attn.qkv.weight"].split([q, kv, kv])
            bq, bk, bv = p[ours + "attn.qkv.bias"].split([q, kv, kv]) if cfg.qkv_bias else (None, None, None)
            if cfg.family == "llama":
                wq, wk = permute_rotary(wq, cfg.n_heads), permute_rotary(wk, cfg.kv_heads)
                if bq is not None:
                    bq, bk = permute_rotary(bq, cfg.n_heads), permute_rotary(bk, cfg.kv_heads)
            for name, weight, b in (("attn_q", wq, bq), ("attn_k", wk, bk), ("attn_v", wv, bv)):
                yield blk + name + ".weight", weight
                if b is not None:
                    yield blk + name + ".bias", b
            if cfg.qk_norm:
                yield blk + "attn_q_norm.weight", p[ours + "attn.q_norm.weight"]
                yield blk + "attn_k_norm.weight", p[ours + "attn.k_norm.weight"]
        yield blk + "attn_output.weight", p[ours + "attn.proj.weight"]
        if gpt2 or cfg.bias:
            yield blk + "attn_output.bias", bias("attn.proj.bias", cfg.emb_dim)
        yield blk + "ffn_norm.weight", p[ours + "norm2.weight"]
        if gpt2:
            yield blk + "ffn_norm.bias", p[ours + "norm2.bias"]
        fc = p[ours + "mlp.fc.weight"]
        fc_bias = p.get(ours + "mlp.fc.bias")
        if cfg.mlp == "swiglu":
            gate, up = fc.split(cfg.hidden_dim)
            yield blk + "ffn_gate.weight", gate
            if fc_bias is not None:
                yield blk + "ffn_gate.bias", fc_bias[: cfg.hidden_dim]
            yield blk + "ffn_up.weight", up
            if fc_bias is not None:
                yield blk + "ffn_up.bias", fc_bias[cfg.hidden_dim :]
        else:
            yield blk + "ffn_up.weight", fc
            yield blk + "ffn_up.bias", bias("mlp.fc.bias", cfg.hidden_dim)
        yield blk + "ffn_down.weight", p[ours + "mlp.proj.weight"]
        if gpt2 or cfg.bias:
            yield blk + "ffn_down.bias", bias("mlp.proj.bias", cfg.emb_dim)


def rope_divisors(cfg: GPTConfig) -> torch.Tensor:
    """Llama 3's stretch as llama.cpp applies it: one divisor per rotary frequency (1 for short wavelengths,
    `factor` for long ones, blended between), which `model.gpt.rope_frequencies` applies as a product."""
    from model.gpt import rope_frequencies

    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    return (plain / rope_frequencies(cfg)).to(torch.float32)


def tensor_type(name: str, tensor: torch.Tensor, quant: str, tied: bool) -> gguf.GGMLQuantizationType:
    """The converter's rule: F32 for vectors, norms, biases and position tables; the output head of a 4-bit file
    at Q8_0 (llama.cpp would give it Q6_K); rows that are not whole 32-value blocks at F16."""
    if tensor.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return F32
    if name.startswith(("position_embd", "rope_freqs")):
        return F32
    wanted = QUANTS[quant][0]
    if quant == "q4_0" and name == ("token_embd.weight" if tied else "output.weight"):
        wanted = Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if tensor.shape[-1] % block == 0 else F16


def write_gguf(
    model: GPTModel, vocabulary: Vocabulary, path: str | Path, quant: str, *, name: str = "gptflow model"
) -> dict[str, Any]:
    """Write `model` with `vocabulary` as a GGUF of `quant` (f16, q8_0, q4_0) at `path`. Returns the tensor count
    per type."""
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    cfg = model.cfg
    if cfg.family == "qwen3" and cfg.rope_scaling is not None:
        raise ExportError("a Qwen3 model with Llama 3's rope scaling has no llama.cpp equivalent")
    if len(vocabulary.tokens) != cfg.vocab_size:
        raise ExportError(f"the vocabulary has {len(vocabulary.tokens)} tokens, the model {cfg.vocab_size}")
    arch = cfg.family
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(QUANTS[quant][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_vocab_size(cfg.vocab_size)
    _add_vocabulary(writer, vocabulary)
    counts: dict[str, int] = {}
    for tensor_name, tensor in gguf_tensors(model):
        qtype = tensor_type(tensor_name, tensor, quant, cfg.tie_weights)
        data = tensor.numpy()
        if qtype == F32:
            array = data.astype(np.float32)
        elif qtype == F16:
            array = data.astype(np.float16)
        else:
            array = gguf.quants.quantize(data.astype(np.float32), qtype)
        writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _add_vocabulary(writer: gguf.GGUFWriter, v: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    writer.add_token_merges(v.merges)
    for value, add in ((v.bos_id, writer.add_bos_token_id), (v.eos_id, writer.add_eos_token_id)):
        if value is not None:
            add(value)
    if v.pad_id is not None:
        writer.add_pad_token_id(v.pad_id)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(False)
    if v.chat_template is not None:
        writer.add_chat_template(v.chat_template)
