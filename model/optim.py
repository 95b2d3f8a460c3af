"""The optimizers and the learning-rate schedule of the one training loop (model.training).

`adamw`: AdamW on every trainable parameter. `muon`: Muon (torch.optim.Muon, momentum orthogonalized by
Newton-Schulz iterations) on the hidden 2-D weights, the attention and MLP matrices of every block, and AdamW on
the rest: embeddings, the tied head, norms, biases, a classifier's head and LoRA adapters. That is the split of
the current GPT-2 speed-run records; Muon's `match_rms_adamw` scaling lets it reuse the AdamW learning rate and
weight decay. Measured on `mini` pretraining: docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from model.configs import OptimizerName


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    kind: OptimizerName = "adamw",
) -> torch.optim.Optimizer:
    """AdamW (the fused kernel: one pass per tensor instead of a dozen), or Muon for the blocks' matrices with
    AdamW for the rest; weight decay on matrices and embeddings (>= 2-D) only, never on biases and LayerNorm.
    Frozen parameters are left out."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    # LoRA's rank-r factors are no hidden weights to orthogonalize: they stay with AdamW, as peft and litgpt train them
    hidden = [
        p for name, p in named if kind == "muon" and p.ndim == 2 and ".blocks." in f".{name}" and ".lora_" not in name
    ]
    muon_ids = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in muon_ids]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)
    if not hidden:
        return adamw
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(adamw, muon)


class MuonAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer to the training loop: one `param_groups` list (the same group dicts as
    the two inner optimizers, so the LR schedule scales both), one step, one state dict."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon) -> None:
        self.adamw, self.muon = adamw, muon
        params = [p for opt in (adamw, muon) for group in opt.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.param_groups = [*adamw.param_groups, *muon.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        self.adamw.step()
        self.muon.step()

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"adamw", "muon"}:
            raise ValueError("not the state of a Muon + AdamW optimizer (keys adamw and muon)")
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])
        self.param_groups = [*self.adamw.param_groups, *self.muon.param_groups]  # loading made new group dicts


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = functools.partial(warmup_cosine, warmup=warmup, total=total, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
