"""The one training loop every stage drives (pretraining, instruction tuning, classifier fine-tuning, the
accuracy bench's domain pretraining), and the config fields they share.

A stage supplies its model, a batch for each micro-batch index, its loss and its evaluation; the loop does the
rest: placement of batches on the model's device, bf16 autocast, gradient accumulation, clipping, the fused AdamW,
the warmup + cosine schedule, checkpoints and exact resume (model, optimizer, schedule, counters, RNG; batches are
a pure function of their index, so the step count is the data position), the non-finite loss guard, evaluation
cadence, keeping the best or the last weights with early stopping, logging and a progress bar.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from gptflow.errors import GptflowError
from gptflow.stage import Stage
from model.checkpoint import FORMAT, CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from model.config import Preset

# Constrained field types: a stage config may change a default (`lr: LearningRate = 2e-3`) without restating them.
LearningRate = Annotated[float, Field(gt=0, description="peak learning rate")]
MinLrRatio = Annotated[
    float, Field(ge=0, le=1, description="final LR / peak LR of the cosine schedule (1.0: constant after warmup)")
]
WarmupSteps = Annotated[int, Field(ge=0, description="linear LR warmup steps")]
GradClip = Annotated[float | None, Field(gt=0, description="clip the gradient norm to this (None: no clipping)")]
Betas = Annotated[tuple[float, float], Field(description="AdamW betas")]
Bf16 = Annotated[bool, Field(description="bf16 autocast (faster on CPUs with bf16 matmuls)")]
EvalEvery = Annotated[
    int | None, Field(gt=0, description="evaluate every N steps (None: once per epoch, or only at the end)")
]


class TrainConfig(BaseModel):
    """Fields every training stage shares. `RUN_ONLY` names the fields that may change between a run and its
    resume (they do not define the product); `identity()` is the rest, the config part of the stage key."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"threads", "log_every", "checkpoint_every"})

    preset: Preset = Field(default="mini", description="model preset for a model built from scratch")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    lr: LearningRate = 5e-5
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay (matrices and embeddings)")
    betas: Betas = (0.9, 0.95)
    warmup_steps: WarmupSteps = 0
    min_lr_ratio: MinLrRatio = 1.0
    grad_clip: GradClip = 1.0
    batch_size: int = Field(default=8, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    seed: int = Field(default=123, description="seed of the initial weights, data order and dropout")
    bf16: Bf16 = False
    threads: int | None = Field(default=None, gt=0, description="torch intra-op threads (None: torch's default)")
    log_every: int = Field(default=10, gt=0, description="log training loss every N steps")
    eval_every: EvalEvery = 50
    checkpoint_every: int = Field(default=100, gt=0, description="write the resumable checkpoint every N steps")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.RUN_ONLY}

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "TrainConfig":
        """A validated copy (pydantic's own `model_copy` does not validate `update`)."""
        return self.model_validate({**self.model_dump(), **(update or {})})


class NonFiniteLossError(GptflowError, FloatingPointError):
    """The loss became NaN or inf; training stopped and the last good checkpoint is kept."""


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW (the fused kernel: one pass per tensor instead of a dozen); weight decay on matrices and
    embeddings (>= 2-D) only, never on biases and LayerNorm. Frozen parameters are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


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


def check_finite(loss: torch.Tensor | float, step: int, where: str | Callable[[], str] = "training") -> None:
    """Raise NonFiniteLossError for a NaN/inf loss; `where` may be a callable, evaluated only then."""
    value = torch.as_tensor(loss)
    if not torch.isfinite(value).all():
        where = where() if callable(where) else where
        raise NonFiniteLossError(
            f"{where} loss is {value.item()} at step {step}; stopped. Lower the learning rate "
            "or turn off bf16; the last good checkpoint is kept"
        )


def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads (None: leave torch's default); returns the count in effect."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def autocast(enabled: bool, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when enabled, else a no-op context."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


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


@dataclass
class TrainState:
    """Counters a resumed run continues from; `best` is the monitored metric at the kept weights."""

    step: int = 0
    tokens_seen: int = 0
    best: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    since_log: dict[str, float] = field(default_factory=dict)  # sums of step losses and batch stats
    since_eval: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """Which weights a stage keeps: `keep="best"` calls `on_best` whenever `metric` improves (and stops after
    `patience` evaluations without improvement); `keep="last"` calls it once, at the final step."""

    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    keep: Literal["best", "last"] = "last"
    patience: int | None = None

    def improved(self, value: float, best: float | None) -> bool:
        return best is None or (value < best if self.mode == "min" else value > best)


class EpochBatches:
    """Index batches over `n` items in a shuffled order per epoch (seeded by seed + epoch); batch i is a pure
    function of i. `drop_last`: every batch full (the book's instruction loader), else a short last batch."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.per_epoch == 0:
            raise ValueError(f"{n} training examples are fewer than one batch of {batch_size}; lower --batch-size")

    def indices(self, i: int) -> list[int]:
        epoch, j = divmod(i, self.per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[j * self.batch_size : (j + 1) * self.batch_size].tolist()


class TrainingCheckpoint:
    """The resumable checkpoint of a stage folder, loaded at most once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._state: dict[str, Any] | None = None

    def load(self) -> dict[str, Any]:
        if self._state is None:
            self._state = load_checkpoint(self.path)
        return self._state

    def stage_key(self) -> dict | None:
        """The stage key it was written under (None when there is no checkpoint)."""
        return self.load().get("stage") if self.path.is_file() else None

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: TrainState,
        stage_key: dict[str, Any],
        **extra: Any,
    ) -> None:
        cfg = getattr(model, "cfg", None)
        save_checkpoint(
            self.path,
            format=FORMAT,
            config=cfg.to_dict() if cfg is not None else None,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            train_state=asdict(state),
            rng=rng_state(),
            stage=stage_key,
            **extra,
        )
        self._state = None

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
        ckpt = self.load()
        for key in ("model", "optimizer", "train_state"):
            if key not in ckpt:
                raise CheckpointError(f"{self.path} is not a training checkpoint: no {key!r} entry")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        return TrainState(**ckpt["train_state"])

    def release(self) -> None:
        """Forget the loaded contents (its tensors can be freed)."""
        self._state = None


CHECKPOINT = "last.pt"  # the resumable training state in every training stage's folder
Batch = Sequence[torch.Tensor]
LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]


def train(
    model: nn.Module,
    config: TrainConfig,
    *,
    stage: Stage,
    total_steps: int,
    batch: Callable[[int], Batch],
    loss: LossFn,
    evaluate: Callable[[bool], dict[str, Any]] | None = None,
    steps_per_epoch: int | None = None,
    select: Selection = Selection(),
    on_best: Callable[[TrainState], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: TrainingCheckpoint | None = None,
    progress: bool = False,
) -> TrainState:
    """Train `model` for `total_steps` optimizer steps of `config.grad_accum` micro-batches each.

    `batch(i)` is micro-batch i (the same i always gives the same batch); `loss(batch)` returns the mean loss and
    stats to sum between logs ("tokens", and "correct"/"n" for an accuracy); `evaluate(final)` (if any) returns
    validation metrics including `select.metric`. The checkpoint `<stage.dir>/last.pt` (`checkpoint`: the one the
    stage's plan already read) is resumed when that plan says so (`stage.decision`), written every
    `config.checkpoint_every` steps and at the end. `on_log` receives every train and eval record (also kept in
    the returned state's history)."""
    set_threads(config.threads)
    device = next(model.parameters()).device
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = build_scheduler(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    state = TrainState()
    ckpt = checkpoint or TrainingCheckpoint(stage.dir / CHECKPOINT)
    if stage.decision is not None and stage.decision.action == "resume":
        stage.check_checkpoint(ckpt.stage_key(), ckpt.path)
        state = ckpt.restore(model, optimizer, scheduler)
        _emit(state, on_log, {"kind": "resume", "step": state.step, "checkpoint": str(ckpt.path)})
    ckpt.release()  # a checkpoint the plan read but training does not resume is not held in memory

    def last_good() -> str:
        return f"training (last good checkpoint: {ckpt.path if ckpt.path.is_file() else 'none yet'})"

    stage.dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    epoch = (lambda step: round(step / steps_per_epoch, 4)) if steps_per_epoch else (lambda step: None)

    def save() -> None:
        ckpt.save(model, optimizer, scheduler, state, stage.key)

    bar = _progress_bar(total_steps, state.step, progress, stage.name)
    clock = time.perf_counter()
    tokens_at_log = state.tokens_seen
    model.train()
    try:
        while state.step < total_steps and not state.stopped_early:
            step_loss = 0.0
            for micro in range(config.grad_accum):
                tensors = [t.to(device) for t in batch(state.step * config.grad_accum + micro)]
                with autocast(config.bf16, device):
                    value, stats = loss(tensors)
                check_finite(value, state.step + 1, last_good)
                (value / config.grad_accum).backward()
                step_loss += value.item() / config.grad_accum
                state.tokens_seen += int(stats.get("tokens", 0))
                for running in (state.since_log, state.since_eval):
                    _add(running, stats)
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            for running in (state.since_log, state.since_eval):
                _add(running, {"loss": step_loss, "steps": 1})
            bar.update(1)
            last = state.step == total_steps
            if state.step % config.log_every == 0 or last:
                now = time.perf_counter()
                tps = (state.tokens_seen - tokens_at_log) / max(now - clock, 1e-9)
                clock, tokens_at_log = now, state.tokens_seen
                record = {
                    "kind": "train",
                    "step": state.step,
                    "epoch": epoch(state.step),
                    **_means(state.since_log),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_seen": state.tokens_seen,
                    "tokens_per_s": tps,
                }
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}")
                _emit(state, on_log, record)
                state.since_log = {}
            due = (
                state.step % config.eval_every == 0
                if config.eval_every
                else (steps_per_epoch is not None and state.step % steps_per_epoch == 0)
            )
            if (due or last) and evaluate is not None:
                metrics = evaluate(last)
                check_finite(metrics.get("val_loss", 0.0), state.step, "validation")
                value = metrics[select.metric]
                improved = last if select.keep == "last" else select.improved(value, state.best)
                if improved:
                    state.best, state.best_step, state.bad_evals = value, state.step, 0
                    if on_best is not None:
                        on_best(state)
                else:
                    state.bad_evals += 1
                train_means = {f"train_{k}": v for k, v in _means(state.since_eval).items()}
                _emit(
                    state,
                    on_log,
                    {
                        "kind": "eval",
                        "step": state.step,
                        "epoch": epoch(state.step),
                        **train_means,
                        **metrics,
                        "best": improved,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_seen": state.tokens_seen,
                    },
                )
                if progress:
                    bar.write(
                        f"step {state.step}: "
                        + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
                    )
                state.since_eval = {}
                state.stopped_early = select.patience is not None and state.bad_evals >= select.patience
                clock = time.perf_counter()  # keep evaluation time out of tokens/s
            if state.step % config.checkpoint_every == 0 or last or state.stopped_early:
                save()
    finally:
        bar.close()
    return state


def _add(sums: dict[str, float], stats: dict[str, float]) -> None:
    for key, value in stats.items():
        sums[key] = sums.get(key, 0.0) + float(value)


def _means(sums: dict[str, float]) -> dict[str, float]:
    """Mean step loss, and accuracy when the batches counted "correct" out of "n"."""
    means = {"loss": sums.get("loss", 0.0) / max(sums.get("steps", 0.0), 1.0)}
    if sums.get("n"):
        means["accuracy"] = sums.get("correct", 0.0) / sums["n"]
    return means


def _emit(state: TrainState, on_log: Callable[[dict[str, Any]], None] | None, record: dict[str, Any]) -> None:
    record = {k: v for k, v in record.items() if v is not None}
    if record["kind"] != "resume":
        state.history.append(record)
    if on_log is not None:
        on_log(dict(record))


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc=desc)
