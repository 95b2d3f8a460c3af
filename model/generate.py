"""Autoregressive generation: greedy or sampled (temperature, top-k, top-p), EOS stop, KV cache."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from gptflow.errors import GptflowError
from model.gpt import GPTModel, mask_positions


class NonFiniteLogitsError(GptflowError, ValueError):
    """The model's logits hold NaN or infinity: its weights are broken, and no token is sampled from them."""


@torch.no_grad()
def generate(
    model: GPTModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Return `input_ids` followed by up to `max_new_tokens` new tokens, (B, T + n).

    Greedy when `temperature == 0`. Generation stops once every row has produced an end token (`eos_id`: one id,
    or several, as Llama 3 and Qwen3 have); the end token is kept and a row that finished early is padded with the
    first end token (see `trim_at_eos`). `attention_mask`
    (B, T), 1 = real token, supports left-padded batches: positions count real tokens only, so each row
    continues as it would alone. Past the context length the window is cropped
    to the last `context_length` tokens and recomputed each step (positions shift, so a cache cannot help).
    NaN or infinite logits raise NonFiniteLogitsError.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    ctx = model.cfg.context_length
    device = input_ids.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    out, mask = input_ids, attention_mask
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    stops = (
        None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    )
    cache = None
    bad_step = torch.zeros((), dtype=torch.long, device=device)  # the first step with non-finite logits (0: none)
    try:
        for step in range(max_new_tokens):
            if use_cache and out.shape[1] <= ctx:
                new = out if cache is None else out[:, -1:]
                if cache is None:
                    cache = model.new_kv_cache(out.shape[0], out.shape[1] + max_new_tokens)
                positions = mask_positions(mask)[:, -new.shape[1] :] if mask is not None else None
                logits = model(new, attention_mask=mask, kv_cache=cache, position_ids=positions)
            else:
                window_mask = mask[:, -ctx:] if mask is not None else None
                positions = mask_positions(window_mask) if window_mask is not None else None
                logits = model(out[:, -ctx:], attention_mask=window_mask, position_ids=positions)
            # Non-finite logits are recorded on the device and raised after the loop: a host sync per step would
            # stall the GPU's queue. Their rows sample from zeros meanwhile, so that sampling itself cannot fail.
            last = logits[:, -1]
            finite = torch.isfinite(last).all(dim=-1, keepdim=True)
            bad_step = torch.where((bad_step == 0) & ~finite.all(), step + 1, bad_step)
            last = torch.where(finite, last, torch.zeros_like(last))
            next_ids = sample_next(last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if stops is not None:
                next_ids = torch.where(finished, stops[0], next_ids)
                finished |= torch.isin(next_ids, stops)
            out = torch.cat([out, next_ids[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if stops is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    if bad := int(bad_step):
        raise NonFiniteLogitsError(f"the model gives NaN or infinite logits at generation step {bad}")
    return out


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token_distribution(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The probabilities (B, V) that sampling draws from: logits scaled by 1/temperature, cut to the `top_k` most
    likely tokens, then to the smallest set whose probability reaches `top_p`. Temperature 0 is greedy: all the
    mass on the most likely token."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def trim_at_eos(ids: list[int], eos_id: int | Sequence[int]) -> list[int]:
    """Tokens before the first end token (the response proper)."""
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)
