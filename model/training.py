"""The one training loop every stage drives (pretraining, instruction tuning, classifier fine-tuning, the
accuracy bench's domain pretraining); their configs are in model.configs.

A stage supplies its model, a batch for each micro-batch index, its loss and its evaluation; the loop does the
rest: the device and precision (model.device), data-parallel training under torchrun (model.distributed),
gradient accumulation, clipping, the fused AdamW, the warmup + cosine schedule, checkpoints and exact resume
(model, optimizer, schedule, counters, RNG of every rank; batches are a pure function of their index, so the step
count is the data position), the non-finite loss guard, evaluation cadence, keeping the best or the last weights
with early stopping, logging and a progress bar.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gptflow.errors import GptflowError
from gptflow.ranks import process_ranks
from gptflow.stage import Stage
from model import distributed, lora
from model.checkpoint import FORMAT, CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from model.configs import TrainConfig
from model.device import allow_tf32
from model.optim import build_optimizer, build_scheduler


class NonFiniteLossError(GptflowError, FloatingPointError):
    """The loss became NaN or inf; training stopped and the last good checkpoint is kept."""


def check_finite(loss: torch.Tensor | float, step: int, where: str | Callable[[], str] = "training") -> None:
    """Raise NonFiniteLossError for a NaN/inf loss; `where` may be a callable, evaluated only then."""
    value = torch.as_tensor(loss)
    if not torch.isfinite(value).all():
        where = where() if callable(where) else where
        raise NonFiniteLossError(
            f"{where} loss is {value.item()} at step {step}; stopped. Lower the learning rate "
            "or use --precision fp32; the last good checkpoint is kept"
        )


def set_threads(n: int | None) -> int:
    """Use `n` intra-op threads (None: leave torch's default); returns the count in effect."""
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


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
    setup: dict[str, Any] = field(default_factory=dict)  # device, precision, world_size, global_batch
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
        self.extra: dict[str, Any] = {}  # plain fields written beside the state (the model's tokenizer files)

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
        scaler: torch.amp.GradScaler,
        state: TrainState,
        stage_key: dict[str, Any],
        rng_ranks: list[dict[str, Any]] | None = None,
    ) -> None:
        """`rng_ranks`: every rank's RNG state in a data-parallel run (this process's alone otherwise)."""
        cfg = getattr(model, "cfg", None)
        save_checkpoint(
            self.path,
            format=FORMAT,
            config=cfg.to_dict() if cfg is not None else None,
            model=lora.saved_tensors(model),  # a LoRA model's: its adapters (and head) only
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(),
            train_state=asdict(state),
            rng=rng_ranks[0] if rng_ranks else rng_state(),
            rng_ranks=rng_ranks or [],
            stage=stage_key,
            **self.extra,
        )
        self._state = None

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: torch.amp.GradScaler,
        rank: int,
    ) -> TrainState:
        """Load the state into objects already on their device (tensors are read to the CPU and copied there, so a
        checkpoint written on a GPU resumes on a CPU and the other way round); rank `rank` takes its own RNG."""
        ckpt = self.load()
        for key in ("model", "optimizer", "train_state"):
            if key not in ckpt:
                raise CheckpointError(f"{self.path} is not a training checkpoint: no {key!r} entry")
        lora.load_weights(model, ckpt["model"], self.path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        set_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
        return TrainState(**ckpt["train_state"])

    def release(self) -> None:
        """Forget the loaded contents (its tensors can be freed)."""
        self._state = None


CHECKPOINT = "last.pt"  # the resumable training state in every training stage's folder
Batch = Sequence[torch.Tensor]
LossFn = Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]


class _LossStep(nn.Module):
    """A stage's loss function as a module over its model, so that DistributedDataParallel runs the forward
    pass that makes the gradients it averages."""

    def __init__(self, model: nn.Module, loss: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(batch)


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
    """Train `model` for `total_steps` optimizer steps of `config.grad_accum` micro-batches each, on
    `config.device` in `config.precision` (the model is moved there), in every process of a torchrun job.

    `batch(i)` is micro-batch i of the global order (the same i always gives the same batch; rank r of W reads
    i = (step x grad_accum + micro) x W + r); `loss(batch)` returns the mean loss and stats to sum between logs
    ("tokens", and "correct"/"n" for an accuracy); `evaluate(final)` (if any, run by rank 0) returns validation
    metrics including `select.metric`. The checkpoint `<stage.dir>/last.pt` (`checkpoint`: the one the stage's
    plan already read) is resumed when that plan says so (`stage.decision`), written every
    `config.checkpoint_every` steps and at the end. `on_log` receives a "resume" record (when it resumes), a "start"
    record naming the stage folder, then every train and eval record (those are kept in the state's history).
    On a rank > 0 the call ends in `FollowerDone` once training is over."""
    set_threads(config.threads)
    ranks = process_ranks()
    world = ranks.world_size
    if config.world_size != world:  # the stage key names the launcher's world size: train with exactly that
        raise distributed.LaunchError(
            f"{stage.name}: the config's launcher runs {config.world_size} training processes but this is a job of "
            f"{world}; start it through its Prefect task or `model.launch`, or set launcher kind local"
        )
    rt = config.runtime()
    allow_tf32(rt.device)
    model.to(rt.device)
    if ranks.distributed:
        distributed.init()
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas, kind=config.optimizer)
    scheduler = build_scheduler(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    state = TrainState()
    ckpt = checkpoint or TrainingCheckpoint(stage.dir / CHECKPOINT)
    resumed = stage.decision is not None and stage.decision.action == "resume"
    if resumed:
        stage.check_checkpoint(ckpt.stage_key(), ckpt.path)
        state = ckpt.restore(model, optimizer, scheduler, scaler, ranks.rank)
        _emit(state, on_log, {"kind": "resume", "step": state.step, "checkpoint": str(ckpt.path)})
    _emit(state, on_log, {"kind": "start", "step": state.step, "folder": str(stage.dir)})  # names the run to callers
    ckpt.release()  # a checkpoint the plan read but training does not resume is not held in memory
    state.setup = {
        "device": str(rt.device),
        "precision": rt.precision,
        "world_size": world,
        "global_batch": config.batch_size * config.grad_accum * world,
    }
    step_fn: nn.Module = _LossStep(model, loss)
    if ranks.distributed:
        step_fn = DistributedDataParallel(step_fn, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if not resumed and ranks.rank > 0:
            torch.manual_seed(config.seed + ranks.rank)  # dropout masks of its own (rank 0 keeps the seed's)

    def last_good() -> str:
        return f"training (last good checkpoint: {ckpt.path if ckpt.path.is_file() else 'none yet'})"

    if ranks.is_main:
        stage.dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    epoch = (lambda step: round(step / steps_per_epoch, 4)) if steps_per_epoch else (lambda step: None)

    def save() -> None:
        """Rank 0 writes (with every rank's RNG); the others wait until the file is there."""
        rngs = distributed.gather(rng_state()) if ranks.distributed else None
        if ranks.is_main:
            ckpt.save(model, optimizer, scheduler, scaler, state, stage.key, rngs)
        if ranks.distributed:
            distributed.barrier()

    bar = _progress_bar(total_steps, state.step, progress and ranks.is_main, stage.name)
    clock = time.perf_counter()
    tokens_at_log = state.tokens_seen
    model.train()
    try:
        while state.step < total_steps and not state.stopped_early:
            step_loss, step_stats = 0.0, {}
            for micro in range(config.grad_accum):
                index = (state.step * config.grad_accum + micro) * world + ranks.rank
                tensors = [t.to(rt.device, non_blocking=True) for t in batch(index)]
                # gradients are averaged across ranks once per step, after the last micro-batch
                syncs = not ranks.distributed or micro == config.grad_accum - 1
                with contextlib.nullcontext() if syncs else step_fn.no_sync():
                    with rt.autocast():
                        value, stats = step_fn(tensors)
                    check_finite(value, state.step + 1, last_good)
                    scaler.scale(value / config.grad_accum).backward()
                step_loss += value.item() / config.grad_accum
                _add(step_stats, stats)
            if ranks.distributed:
                step_loss, step_stats = _sum_over_ranks(step_loss, step_stats, rt.device, world)
            state.tokens_seen += int(step_stats.get("tokens", 0))
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            for running in (state.since_log, state.since_eval):
                _add(running, {**step_stats, "loss": step_loss, "steps": 1})
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
                metrics = evaluate(last) if ranks.is_main else None
                if ranks.distributed:
                    metrics = distributed.broadcast(metrics)
                check_finite(metrics.get("val_loss", 0.0), state.step, "validation")
                value = metrics[select.metric]
                improved = last if select.keep == "last" else select.improved(value, state.best)
                if improved:
                    state.best, state.best_step, state.bad_evals = value, state.step, 0
                    if on_best is not None and ranks.is_main:
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
                if progress and ranks.is_main:
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
    if not ranks.is_main:
        raise distributed.FollowerDone
    return state


def _sum_over_ranks(
    step_loss: float, stats: dict[str, float], device: torch.device, world: int
) -> tuple[float, dict[str, float]]:
    """The step's mean loss over all ranks and its stats summed over them (one all-reduce)."""
    keys = sorted(stats)
    on = device if device.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors, gloo CPU ones
    values = torch.tensor([step_loss, *(stats[k] for k in keys)], dtype=torch.float64, device=on)
    torch.distributed.all_reduce(values)
    values = values.tolist()
    return values[0] / world, dict(zip(keys, values[1:]))


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
    if record["kind"] not in ("resume", "start"):
        state.history.append(record)
    if on_log is not None:
        on_log(dict(record))


def _progress_bar(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, desc=desc)
