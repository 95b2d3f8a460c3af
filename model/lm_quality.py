"""The quality of an exported language model: perplexity, parity of the ONNX decoder with PyTorch, greedy-token
agreement of int8 with fp32, tokens per second, and the rows and prompts they are measured on.

The rows are encoded with the model's own tokenizer (GPT-2's BPE, or the Hugging Face tokenizer its checkpoint
keeps): an instructions folder as fine-tuning encodes it (`model.instruct`, in the model's style: Alpaca, Phi-3 or
its chat template), a corpus folder's GPT-2 token file decoded to its text and encoded again when the model reads
another vocabulary."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from edge.lm import Decoder, EdgeGenerator
from edge.runtime import ORT_FILES
from edge.text import PAD_ID
from gptflow.prompts import CHAT
from gptflow.splits import read_instructions
from gptflow.storage import read_json
from model.configs import ExportConfig
from model.gpt import GPTModel, mask_positions
from model.init import text_tokenizer
from model.instruct import encode_entries, prompt_ids
from model.onnx_export import ExportError
from model.pretrain import load_tokens


def perplexity(logits_of: Any, rows: Sequence[Sequence[int]]) -> float:
    """exp(mean next-token negative log-likelihood) over every position of every row; `logits_of(row)` gives
    the (T, V) logits of one row."""
    total, count = 0.0, 0
    for row in rows:
        logits = np.asarray(logits_of(row[:-1]), dtype=np.float64)
        z = logits - logits.max(axis=-1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return math.exp(total / count)


@torch.no_grad()
def torch_logits(model: GPTModel, row: Sequence[int]) -> np.ndarray:
    device = next(model.parameters()).device
    return model(torch.tensor([list(row)], device=device))[0].float().cpu().numpy()


@torch.no_grad()
def decoder_parity(
    model: GPTModel, decoder: Decoder, prompts: Sequence[Sequence[int]], steps: int, pad_id: int = PAD_ID
) -> dict:
    """Max |logit difference| between PyTorch (KV cache) and the ONNX decoder for the prompt pass of a left-padded
    batch (real positions only) and `steps` cached decoding steps that follow PyTorch's greedy tokens."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    steps = min(steps, model.cfg.context_length - width)
    cache = model.new_kv_cache(len(prompts), width + steps)
    new, past, prompt_diff, step_diff = ids, None, 0.0, 0.0
    for step in range(steps + 1):
        t_mask = torch.from_numpy(mask).to(device)
        t_new = torch.from_numpy(new).to(device)
        expected = model(t_new, t_mask, cache, mask_positions(t_mask)[:, -new.shape[1] :]).float().cpu().numpy()
        got, past = decoder.run(new, mask, past)
        diff = np.abs(expected - got)
        if step == 0:
            prompt_diff = float(diff[mask.astype(bool)].max())
        else:
            step_diff = max(step_diff, float(diff.max()))
        new = expected[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return {"prompt_max_abs_logit_diff": prompt_diff, "steps": steps, "steps_max_abs_logit_diff": step_diff}


def teacher_forced_matches(candidate: Decoder, prompt: Sequence[int], expected: Sequence[int]) -> int:
    """How many tokens of `expected` (a continuation of `prompt`) `candidate` picks greedily when given the
    tokens before each one (one pass over prompt + continuation)."""
    logits = candidate.sequence_logits(list(prompt) + list(expected[:-1]))
    return int((logits[len(prompt) - 1 :].argmax(-1) == np.asarray(expected)).sum())


def token_agreement(reference: Decoder, candidate: Decoder, prompts: Sequence[Sequence[int]], n_tokens: int) -> dict:
    """Greedy agreement of `candidate` with `reference`: teacher-forced (at each position of the reference's
    greedy continuation, does the candidate pick the same token) and whole continuations equal."""
    same = total = identical = 0
    for prompt in prompts:
        expected = reference.generate([prompt], n_tokens, eos_id=None)[0]
        same += teacher_forced_matches(candidate, prompt, expected)
        total += len(expected)
        identical += candidate.generate([prompt], n_tokens, eos_id=None)[0] == expected
    return {"token_agreement": same / total, "identical_continuations": identical / len(prompts), "tokens": total}


def tokens_per_second(decoder: Decoder, prompt: Sequence[int], n_tokens: int) -> float:
    started = time.perf_counter()
    new = decoder.generate([prompt], n_tokens, eos_id=None)[0]
    return len(new) / (time.perf_counter() - started)


def bundle_perplexity(bundle: str | Path, data_dir: str | Path, config: ExportConfig | None = None) -> dict[str, Any]:
    """Validation perplexity of an LM bundle as it ships (its int8 decoder when it has one, through onnxruntime)
    on `data_dir`: what the registry compares a challenger and the champion on."""
    config = config or ExportConfig()
    int8 = ORT_FILES["int8"] in read_json(Path(bundle) / "manifest.json").get("files", {})
    generator = EdgeGenerator(bundle, int8=int8)
    style = (generator.manifest.get("prompt") or {}).get("style")
    rows, _ = eval_rows(Path(data_dir), generator.tokenizer, style, generator.context_length, config)
    return {
        "val_perplexity": perplexity(generator.decoder.sequence_logits, rows),
        "n": len(rows),
        "model": "int8" if int8 else "fp32",
    }


# ----------------------------------------------------------------------------------------- evaluation data


def eval_style(tokenizer: Any, style: str | None) -> str:
    """The style an instructions folder is encoded in for a model: the one it was tuned in, else its chat template
    when it has one, else the book's Alpaca prompt."""
    if style:
        return style
    return CHAT if getattr(tokenizer, "chat_template", None) else "alpaca"


def eval_rows(
    data_dir: Path, tokenizer: Any, style: str | None, context: int, config: ExportConfig, *, settings=None
) -> tuple:
    """(perplexity rows, agreement prompts) from an instructions data folder (validation.json, test.json) or a
    corpus folder (val.bin), encoded with `tokenizer` (the model's: GPT-2's BPE as a tiktoken encoding or
    `GPT2Text`, or an `HFTokenizer`). Rows fit the context; prompts leave room for the agreement tokens."""
    tokenizer = text_tokenizer(None, tokenizer)
    limit = config.max_eval_rows
    room = max(1, context - config.agreement_tokens)
    if (data_dir / "validation.json").is_file() and (data_dir / "test.json").is_file():
        style = eval_style(tokenizer, style)
        val, test = (read_instructions(data_dir / f"{split}.json") for split in ("validation", "test"))
        # encoded as fine-tuning encodes them: the example, then one end token (a chat render ends with its own)
        end = [] if style == CHAT else [tokenizer.eos_id]
        rows = [(ids + end)[: context + 1] for ids, _ in encode_entries(val[:limit], tokenizer, style)]
        prompts = [prompt_ids(tokenizer, e, style)[-room:] for e in test[:limit]]
        return _fit_vocab(rows, tokenizer, data_dir), prompts
    if (data_dir / "val.bin").is_file():
        tokens = _corpus_tokens(data_dir, tokenizer, settings)
        n = min(limit or len(tokens), max(1, (len(tokens) - 1) // context))
        rows = [tokens[i * context : i * context + context + 1].tolist() for i in range(n)]
        return _fit_vocab(rows, tokenizer, data_dir), [r[: min(32, room)] for r in rows]
    raise ExportError(
        f"{data_dir}: expected an instructions data folder (validation.json, test.json) or a corpus folder "
        "(val.bin) to measure perplexity and int8 agreement; pass --data"
    )


def _corpus_tokens(data_dir: Path, tokenizer: Any, settings=None) -> np.ndarray:
    """The corpus folder's validation tokens for this model. The corpus stage writes GPT-2 ids (meta.json
    `tokenizer: gpt2`): a model with another vocabulary reads their text, decoded and encoded with its own."""
    tokens = load_tokens(data_dir / "val.bin")
    meta = read_json(data_dir / "meta.json") if (data_dir / "meta.json").is_file() else {}
    if meta.get("tokenizer", "gpt2") != "gpt2" or tokenizer.files is None:
        return np.asarray(tokens)
    from gptflow.tokenizer import get_tokenizer

    text = get_tokenizer(settings).decode(np.asarray(tokens).tolist())
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _fit_vocab(rows: list[list[int]], tokenizer: Any, data_dir: Path) -> list[list[int]]:
    """`rows`, once every row holds two tokens or more and every id is the tokenizer's."""
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ExportError(f"{data_dir}: no validation row of two tokens or more to measure perplexity on")
    top = max(max(r) for r in rows)
    if top >= tokenizer.vocab_size:
        raise ExportError(
            f"{data_dir}: token id {top} is outside the model's tokenizer ({tokenizer.vocab_size} ids): the folder "
            "was encoded with another vocabulary"
        )
    return rows
