"""The forward trace of `gptflow inspect`: one pass with hooks on block 0 and the last block, each step's shape,
mean, std and first values, named for the model's family, and every head's attention weights.

Read off the model itself (forward hooks, `GPTModel.recording_attention`, its own rotary functions), so a trace is
never of a second copy of the architecture. `model.introspect` turns it into the report.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from model.classifier import SequenceClassifier
from model.config import GPTConfig
from model.gpt import GPTModel, rope_angles, rope_frequencies, rotate

TRACE_VALUES = 6  # first values of each step shown in the trace


def traced_forward(
    model: GPTModel, classifier: SequenceClassifier | None, input_ids: torch.Tensor
) -> tuple[list[dict], np.ndarray, list, torch.Tensor]:
    """One forward pass with hooks: (trace rows, attention (L, H, T, T), the hidden state entering block 0 and
    leaving every block, the model's output: logits (B, T, V), or class logits (B, C) of `classifier`, whose
    backbone `model` is).

    Steps are named for the model's family: LayerNorm or RMSNorm; Q/K/V per head (a grouped-query layer's K and V
    have its key/value heads), Qwen3's q_norm/k_norm, the rotated Q and K of a rotary model; GELU or SwiGLU."""
    cfg = model.cfg
    norm = "LayerNorm" if cfg.norm == "layernorm" else "RMSNorm"
    last = len(model.blocks) - 1
    trace: list[dict] = []
    hidden: list[torch.Tensor] = []
    handles = []

    def capture(module: nn.Module, part: str, step: str, name: str, *, on_input: bool = False) -> None:
        def record(tensor: torch.Tensor) -> None:
            trace.append(_trace_row(part, step, name, tensor))

        if on_input:
            handles.append(module.register_forward_pre_hook(lambda _m, args: record(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _args, out: record(out)))

    def keep_hidden(module: nn.Module) -> None:
        handles.append(module.register_forward_hook(lambda _m, _a, out: hidden.append(out)))

    with model.recording_attention() as weights:

        def record_weights(block: nn.Module, part: str, name: str) -> None:  # recorded before the heads merge
            handles.append(
                block.attn.proj.register_forward_pre_hook(
                    lambda _m, _a: trace.append(_trace_row(part, "attention weights", name, weights[-1]))
                )
            )

        capture(model.tok_emb, "embeddings", "token embedding", "tok_emb")
        if cfg.positions == "learned":
            capture(model.pos_emb, "embeddings", "position embedding", "pos_emb")
            capture(model.drop, "embeddings", "token + position", "drop")
        keep_hidden(model.drop)
        for index, block in enumerate(model.blocks):
            keep_hidden(block)
            if index not in (0, last):
                continue
            part, prefix = f"block {index}", f"blocks.{index}"
            attn = f"{prefix}.attn"
            capture(block.norm1, part, f"{norm} 1", f"{prefix}.norm1")
            qk = _QKRows(trace, part, attn, cfg)
            handles.append(block.attn.qkv.register_forward_hook(qk.from_qkv))
            if cfg.qk_norm:
                handles.append(block.attn.q_norm.register_forward_hook(qk.from_norm("Q", "q_norm")))
                handles.append(block.attn.k_norm.register_forward_hook(qk.from_norm("K", "k_norm")))
            if cfg.positions == "rope":
                handles.append(block.attn.proj.register_forward_pre_hook(qk.rotated))
            record_weights(block, part, attn)
            capture(block.attn.proj, part, "attention output (heads merged)", f"{attn}.proj", on_input=True)
            capture(block.attn, part, "attention projection", attn)
            capture(block.norm2, part, "residual 1 (x + attention)", f"{prefix}.norm2", on_input=True)
            capture(block.norm2, part, f"{norm} 2", f"{prefix}.norm2")
            if cfg.mlp == "swiglu":
                handles.append(block.mlp.fc.register_forward_hook(_gate_up_hook(trace, part, f"{prefix}.mlp.fc")))
                capture(block.mlp.proj, part, "SwiGLU: silu(gate) * up", f"{prefix}.mlp.proj", on_input=True)
            else:
                capture(block.mlp.fc, part, "MLP hidden (fc)", f"{prefix}.mlp.fc")
                capture(block.mlp.proj, part, "GELU", f"{prefix}.mlp.proj", on_input=True)
            capture(block.mlp, part, "MLP output", f"{prefix}.mlp")
            capture(block, part, "residual 2 (block output)", prefix)
        capture(model.final_norm, "output", f"final {norm}", "final_norm")
        try:
            if classifier is None:
                capture(model.out_head, "output", "logits", "out_head")
                output = model(input_ids)
            else:
                capture(classifier.head, "output", "class logits (pooled)", "head")
                output = classifier(input_ids, torch.ones_like(input_ids))
        finally:
            for handle in handles:
                handle.remove()
    attention = torch.stack([w[0] for w in weights]).float().cpu().numpy()
    return trace, attention, hidden, output


class _QKRows:
    """Trace rows of one attention layer's queries, keys and values per head, (B, heads, T, head_dim), from the
    fused projection's output [H*D queries | KV*D keys | KV*D values]; then, where the model has them, the q/k
    norms' outputs and (rotary positions) the queries and keys as the attention reads them, rotated by the model's
    own rotary functions at positions 0..T-1 (the traced pass has no cache)."""

    def __init__(self, trace: list[dict], part: str, attn: str, cfg: GPTConfig) -> None:
        self.trace, self.part, self.attn, self.cfg = trace, part, attn, cfg
        self.latest: dict[str, torch.Tensor] = {}

    def from_qkv(self, _module, _args, out: torch.Tensor) -> None:
        B, T, _ = out.shape
        H, KV, D = self.cfg.n_heads, self.cfg.kv_heads, self.cfg.head_dim
        q, k, v = out.view(B, T, H + 2 * KV, D).transpose(1, 2).split([H, KV, KV], dim=1)
        for name, tensor in (("Q", q), ("K", k), ("V", v)):
            self.trace.append(_trace_row(self.part, name, f"{self.attn}.qkv", tensor))
        self.latest = {"Q": q, "K": k}

    def from_norm(self, which: str, module: str) -> Callable:
        def hook(_module, _args, out: torch.Tensor) -> None:
            self.trace.append(
                _trace_row(self.part, f"{which} after {module} (RMSNorm per head)", f"{self.attn}.{module}", out)
            )
            self.latest[which] = out

        return hook

    def rotated(self, _module, _args) -> None:
        for which in ("Q", "K"):
            x = self.latest[which]
            cos, sin = rope_angles(
                rope_frequencies(self.cfg, x.device), torch.arange(x.shape[2], device=x.device), x.dtype
            )
            step = f"{which} rotated (RoPE)"
            self.trace.append(_trace_row(self.part, step, f"{self.attn} (rotary)", rotate(x, cos, sin)))


def _gate_up_hook(trace: list[dict], part: str, module: str) -> Callable:
    """SwiGLU's fused projection [gate | up] as two rows, (B, T, hidden) each."""

    def hook(_module, _args, out: torch.Tensor) -> None:
        gate, up = out.chunk(2, dim=-1)
        trace.append(_trace_row(part, "MLP gate (fc, first half)", module, gate))
        trace.append(_trace_row(part, "MLP up (fc, second half)", module, up))

    return hook


def _trace_row(part: str, step: str, module: str, tensor: torch.Tensor) -> dict[str, Any]:
    """Shape, mean, std and the first values at the last position (first head, first batch row)."""
    t = tensor.detach().float()
    if t.dim() == 4:  # (B, H, T, d)
        values = t[0, 0, -1]
    elif t.dim() == 3:  # (B, T, E)
        values = t[0, -1]
    elif t.dim() == 2 and module == "pos_emb":  # (T, E)
        values = t[-1]
    else:  # (B, C)
        values = t[0]
    return {
        "part": part,
        "step": step,
        "module": module,
        "shape": list(t.shape),
        "mean": float(t.mean()),
        "std": float(t.std()) if t.numel() > 1 else 0.0,
        "values": [float(v) for v in values[:TRACE_VALUES]],
    }
