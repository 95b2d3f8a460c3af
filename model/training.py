"""Training pieces shared by pretraining and the fine-tuning loops: optimizer, schedule, checkpoint/resume,
non-finite loss guard, threads and bf16 autocast."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from gptflow.errors import GptflowError
from model.checkpoint import FORMAT, CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state


class NonFiniteLossError(GptflowError, FloatingPointError):
    """The loss became NaN or inf; training stopped and the last good checkpoint is kept."""


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW (the fused kernel: one pass per tensor instead of a dozen); weight decay on matrices and
    embeddings (>= 2-D) only, never on biases and LayerNorm. Frozen parameters (requires_grad False) are left
    out."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return min_ratio
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                    min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = functools.partial(warmup_cosine, warmup=warmup, total=total, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def check_finite(loss: torch.Tensor, step: int, where: str = "training") -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"{where} loss is {loss.item()} at step {step}; stopped. Lower the learning rate or turn off bf16; "
            "the last good checkpoint is kept"
        )


def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads (None: leave torch's default); returns the count in effect."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def autocast(enabled: bool, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when enabled, else a no-op context."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


@dataclass
class TrainState:
    """Progress counters that a resumed run continues from."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)


def save_training_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainState,
    **extra: Any,
) -> Path:
    """Model, optimizer, scheduler, counters and RNG states, written atomically. `model.cfg` (if present) is
    stored as a dict so `load_model` can rebuild the model; `extra` holds plain values and tensors
    (config dicts, data-sampler state)."""
    cfg = getattr(model, "cfg", None)
    return save_checkpoint(
        path,
        format=FORMAT,
        config=cfg.to_dict() if cfg is not None else None,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        train_state=asdict(state),
        rng=rng_state(),
        **extra,
    )


def load_training_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    restore_rng: bool = True,
) -> tuple[TrainState, dict[str, Any]]:
    """Restore everything `save_training_checkpoint` wrote; returns the counters and the whole checkpoint
    dict (for the `extra` entries)."""
    ckpt = load_checkpoint(path)
    for key in ("model", "optimizer", "train_state"):
        if key not in ckpt:
            raise CheckpointError(f"{path} is not a training checkpoint: no {key!r} entry")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["train_state"]), ckpt


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch to eval (no dropout) and no_grad for the block, restoring the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
