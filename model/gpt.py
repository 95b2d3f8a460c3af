"""One decoder-only transformer for the GPT-2 family, the Llama family and Qwen3 (the switches: `model.config`).

GPT-2: pre-LayerNorm blocks, fused q/k/v attention through `F.scaled_dot_product_attention`, tanh-GELU MLP,
learned positions, LM head tied to the token embedding. Llama: RMSNorm, SwiGLU MLP (gate and up fused in one
matrix), rotary positions, fewer key/value heads than query heads (the cache stores the key/value heads only).
Qwen3: Llama plus RMSNorm on each head's queries and keys before the rotation.

The no-cache forward has no Python branches on tensor values, so `torch.onnx.export(dynamo=True)` traces it
with dynamic batch and sequence.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GPTConfig


class KVCache:
    """Preallocated keys/values for every layer, shape (B, kv_heads, max_len, head_dim); `pos` tokens are filled."""

    def __init__(
        self,
        cfg: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = min(max_len or cfg.context_length, cfg.context_length)
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v for `layer` after the filled part; return all keys/values so far."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.keys[layer][:, :, self.pos : end] = k
        self.values[layer][:, :, self.pos : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


class ConcatCache:
    """Keys/values that come in and go out as tensors, as in the ONNX decoder (`past_key_values` in, `present`
    out): each layer's new keys/values are concatenated to its past, nothing is written in place, so the graph
    exports with a dynamic past length, 0 included. `present[i]` is layer i's (keys, values) after the step."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.pos = past[0][0].shape[2]
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        self.present.append((torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)))
        return self.present[-1]

    def advance(self, n: int) -> None:
        """Nothing to do: the past length is the tensors' own."""


Cache = KVCache | ConcatCache


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) that count real tokens only: a left-padded row starts at 0 like an unpadded one
    (padding itself gets 0), as Hugging Face transformers does."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def make_norm(cfg: GPTConfig, dim: int) -> nn.Module:
    """LayerNorm (GPT-2, with a bias) or RMSNorm (Llama, Qwen3), at the model's epsilon."""
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layernorm" else nn.RMSNorm(dim, eps=cfg.norm_eps)


def rope_frequencies(cfg: GPTConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,) in fp32, with Llama 3's stretch when the config has `rope_scaling`:
    long wavelengths slowed by `factor`, short ones kept, the band between blended smoothly. Computed where they
    are used rather than kept as a buffer, so that neither a bf16 cast nor a model built on the meta device can
    change them."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    old = scaling.original_context_length
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * slowed / scaling.factor + smooth * slowed
    middle = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
    return torch.where(middle, blended, slowed)


def rope_angles(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (B|1, 1, T, head_dim), for `position_ids` (B, T) or (T,); computed in fp32."""
    positions = position_ids.reshape(-1, position_ids.shape[-1]).float()
    angles = positions[:, :, None] * inv_freq[None, None, :]  # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Hugging Face's Llama applies it: the head's two halves are the rotated pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.dropout
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(q_dim, cfg.emb_dim, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, cfg.head_dim), make_norm(cfg, cfg.head_dim)
        self.qk_norm = cfg.qk_norm
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.recorded: list[torch.Tensor] | None = None  # set by `GPTModel.recording_attention`

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: Cache | None,
        layer: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * KV, D).transpose(1, 2).split([H, KV, KV], dim=1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        past = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        dropout, groups = (self.dropout if self.training else 0.0), KV != H
        if self.recorded is not None:
            if groups:  # grouped-query attention: each key/value head serves H/KV query heads
                k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
            y = self._attend_recording(q, k, v, mask, past, dropout)
        elif mask is None:
            # No mask: no past (the kernel's top-left causal mask is exact) or one new token (nothing to hide).
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=past == 0, enable_gqa=groups)
        else:  # `enable_gqa`: the kernel reads each key/value head for its query heads, no repeated copy (4x on a step)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=groups)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def _attend_recording(self, q, k, v, mask: torch.Tensor | None, past: int, dropout: float) -> torch.Tensor:
        """The attention of `F.scaled_dot_product_attention` spelled out, so that its weights (B, H, Tq, Tk) can be
        kept: the fused kernel never materializes them. Same mask rules (bottom-right causal, or `mask`)."""
        if mask is None:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=past)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        self.recorded.append(weights.detach())
        return F.dropout(weights, dropout, training=dropout > 0) @ v


class MLP(nn.Module):
    """tanh-GELU (GPT-2), or SwiGLU (Llama): `fc` holds the gate and up projections stacked, one matmul for both."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.fc = nn.Linear(cfg.emb_dim, (2 if self.swiglu else 1) * cfg.hidden_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.dropout(self.proj(F.silu(gate) * up))
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: Cache | None,
        layer: int,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, kv_cache, layer, rope)
        return x + self.mlp(self.norm2(x))


def attention_bias(
    attention_mask: torch.Tensor | None, q_len: int, past: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B|1, 1, q_len, past+q_len) mask: causal, aligned bottom-right, and padding keys hidden.

    `attention_mask` is (B, past+q_len), 1 = real token. A query may always see itself, so a padded query
    row (left padding) is never fully masked, which would make softmax NaN; its output is ignored anyway.
    Returns None when the fused kernel's own causal mask (or none, for one cached token) is exact.
    """
    if attention_mask is None and (past == 0 or q_len == 1):
        return None
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + past  # absolute position of each query
    k_pos = torch.arange(past + q_len, device=device).unsqueeze(0)
    allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0)  # (1, 1, Tq, Tk)
    if attention_mask is not None:
        real_key = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
        allowed = allowed & (real_key | (k_pos == q_pos))
    return allowed


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg, cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    @contextlib.contextmanager
    def recording_attention(self) -> Iterator[list[torch.Tensor]]:
        """Keep every attention layer's weights (B, H, Tq, Tk), in layer order, for the forward passes run inside:

        with model.recording_attention() as weights:
            logits = model(ids)
        """
        weights: list[torch.Tensor] = []
        attentions = [block.attn for block in self.blocks]
        for attn in attentions:
            attn.recorded = weights
        try:
            yield weights
        finally:
            for attn in attentions:
                attn.recorded = None

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        param = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, max_len, device=param.device, dtype=param.dtype)

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, (B, T, E).

        With `kv_cache`, `input_ids` are the new tokens and `attention_mask` (if any) covers the cached and
        the new tokens, (B, past+T); the cache advances by T. `position_ids` (B, T) default to the tokens'
        indices; a left-padded batch passes `mask_positions(attention_mask)` so that padding shifts nothing.
        """
        T = input_ids.shape[1]
        past = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)
        x = self.tok_emb(input_ids)
        rope = None
        if self.cfg.positions == "learned":
            x = x + self.pos_emb(position_ids)
        else:
            rope = rope_angles(rope_frequencies(self.cfg, x.device), position_ids, x.dtype)
        x = self.drop(x)
        mask = attention_bias(attention_mask, T, past, input_ids.device)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, kv_cache, i, rope)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.final_norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits, (B, T, vocab_size)."""
        return self.out_head(self.features(input_ids, attention_mask, kv_cache, position_ids))

    def head_weight(self) -> torch.Tensor:
        """The output head's matrix as the forward pass applies it (with a LoRA adapter's update where it has one),
        for losses that multiply by it themselves (model.fused_loss)."""
        effective = getattr(self.out_head, "effective_weight", None)
        return effective() if effective is not None else self.out_head.weight

    def num_params(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())
