"""Next-token pretraining on the corpus stage's uint16 token files (`train.bin`, `val.bin`).

Outputs in the stage folder: `last.pt` (the resumable training state, see model.training), `model.pt` (final
weights, what `generate` and fine-tuning read) and `metrics.json` (final metrics and the whole history).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from gptflow.errors import GptflowError
from gptflow.stage import Built, Stage
from gptflow.storage import read_json, write_json_atomic
from model import lora
from model.checkpoint import save_model
from model.configs import PretrainConfig
from model.device import autocast, check_fits
from model.distributed import replicated
from model.fused_loss import IGNORE_INDEX, linear_cross_entropy
from model.generate import generate
from model.gpt import GPTModel
from model.training import (
    CHECKPOINT,
    TrainingCheckpoint,
    TrainState,
    eval_mode,
    train,
)

# Devices where the fused LM-head loss (model.fused_loss) is the faster one; elsewhere the loss is F.linear +
# F.cross_entropy, whose kernels a GPU runs well (bench/loss_head.py measures both on the device at hand).
FUSED_LOSS_DEVICES = frozenset({"cpu"})
TOKEN_FILES = ("train.bin", "val.bin")
MODEL = "model.pt"
METRICS = "metrics.json"


class PretrainError(GptflowError, ValueError):
    """Pretraining input is unusable."""


def load_tokens(path: Path) -> np.ndarray:
    if not path.is_file():
        raise PretrainError(f"token file {path} does not exist; run `gptflow data corpus NAME` first")
    if path.stat().st_size % 2:
        raise PretrainError(f"{path} has an odd byte count: not a uint16 token file")
    return np.memmap(path, dtype=np.uint16, mode="r")


class TokenWindows:
    """(input, target) batches of `context`-token windows; batch i is a pure function of i (and the seed)."""

    def __init__(self, tokens: np.ndarray, context: int, batch_size: int, mode: str, seed: int) -> None:
        self.tokens, self.context, self.batch_size, self.mode, self.seed = tokens, context, batch_size, mode, seed
        self.n_windows = (len(tokens) - 1) // context  # strided windows
        self.max_start = len(tokens) - context - 1  # random windows start in [0, max_start]
        if self.max_start < 0:
            raise PretrainError(
                f"{len(tokens)} tokens are fewer than one window of {context + 1}; "
                "use a longer corpus or a smaller --context-length"
            )

    def starts(self, index: int) -> np.ndarray:
        if self.mode == "random":
            return np.random.default_rng((self.seed, index)).integers(0, self.max_start + 1, self.batch_size)
        return (index * self.batch_size + np.arange(self.batch_size)) % self.n_windows * self.context

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(self.starts(index))

    def rows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.tokens[s : s + self.context + 1] for s in starts]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def lm_loss(features: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the LM head on `features` (B, T, E) over the targets that are not
    IGNORE_INDEX (0, not NaN, when there are none). On the CPU the head and the loss are fused, so the
    (B*T, vocab) fp32 logits never exist (see model.fused_loss); on other devices it is the plain head and
    `F.cross_entropy`. Pretraining and instruction fine-tuning both train through it."""
    hidden, targets = features.flatten(0, 1), targets.flatten()
    if hidden.device.type in FUSED_LOSS_DEVICES:
        return linear_cross_entropy(hidden, head_weight, targets)
    logits = F.linear(hidden, head_weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 autocast logits: fp32 softmax
    total = F.cross_entropy(logits, targets, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def evaluate(
    model: GPTModel, tokens: np.ndarray, context: int, batch_size: int, max_batches: int, precision: str
) -> float:
    """Mean loss over up to `max_batches` batches of strided windows spread evenly over `tokens`."""
    windows = TokenWindows(tokens, context, batch_size, "strided", seed=0)
    n = min(windows.n_windows, max_batches * batch_size)
    if n == 0:
        raise PretrainError(f"validation split has {len(tokens)} tokens, fewer than one window of {context + 1}")
    chosen = np.linspace(0, windows.n_windows - 1, n).round().astype(np.int64) * context
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model), autocast(precision, device):
        for i in range(0, n, batch_size):
            x, y = (t.to(device) for t in windows.rows(chosen[i : i + batch_size]))
            total += lm_loss(model.features(x), model.head_weight(), y).item() * len(x)
            count += len(x)
    return total / count


@dataclass
class LMResult:
    """What a language-model stage (pretraining, instruction tuning) made: `last.pt`, `model.pt`, metrics."""

    out_dir: Path
    checkpoint: Path
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False


def run_lm_stage(stage: Stage, resume: bool, build: Callable[[TrainingCheckpoint], Built]) -> LMResult:
    """Run a language-model stage (`Stage.run`): `build(checkpoint)` trains from the checkpoint the plan read
    (loaded once) and ends with `finish_lm_stage`."""
    checkpoint = TrainingCheckpoint(stage.dir / CHECKPOINT)
    result = stage.run(lambda decision: build(checkpoint), resume=resume, checkpoint=checkpoint.stage_key)
    history = read_json(stage.dir / METRICS)["history"] if result.reused else result.value
    return LMResult(stage.dir, stage.dir / CHECKPOINT, stage.dir / MODEL, result.metrics, history, result.reused)


def finish_lm_stage(
    stage: Stage,
    model: GPTModel,
    state: TrainState,
    *,
    data_dir: Path | None = None,
    tokenizer: dict[str, str] | None = None,
    **extra: Any,
) -> Built:
    """Final metrics from the history (plus `extra`), `model.pt` (with the prompt style if `extra` names one, the
    model's tokenizer files `tokenizer` where it has its own, and the corpus or instructions folder it learned
    from, which `export --int8` measures on by default) and `metrics.json`: what the stage built, its history as
    the value."""
    trains = [h for h in state.history if h["kind"] == "train"]
    evals = [h for h in state.history if h["kind"] == "eval"]
    final = {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_loss": trains[-1]["loss"] if trains else None,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min((e["val_loss"] for e in evals), default=None),
        "params": model.num_params(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **({"lora": lora.summary(model)} if lora.is_lora(model) else {}),
        **state.setup,
        **extra,
    }
    fields = {k: v for k, v in extra.items() if k == "style"} | ({"tokenizer": tokenizer} if tokenizer else {})
    if data_dir is not None:
        fields["data_dir"] = str(data_dir)
    save_model(stage.dir / MODEL, model, metrics=final, **fields)
    write_json_atomic(stage.dir / METRICS, {"final": final, "history": state.history})
    return Built([CHECKPOINT, MODEL, METRICS], final, state.history)


def pretrain_stage(
    data_dir: str | Path, config: PretrainConfig, out_dir: str | Path | None = None, force: bool = False
) -> Stage:
    """The pretraining stage, once its shape fits: both splits hold a window (validation runs at least at the end)
    and a training step fits the device's memory. Both are checked before the first step, not minutes into it."""
    data_dir = Path(data_dir)
    shape = config.model_config_for()
    window = shape.context_length + 1
    for name, split in zip(TOKEN_FILES, ("training", "validation")):
        n = len(load_tokens(data_dir / name))
        if n < window:
            raise PretrainError(
                f"{data_dir / name}: the {split} split holds {n} tokens, fewer than one window of {window} "
                f"(--context-length {shape.context_length} + 1); use a longer corpus or a smaller --context-length"
            )
    check_fits(shape, config.batch_size, shape.context_length, config.runtime(), f"pretraining {config.preset}")
    return Stage.declare(
        "pretrain",
        inputs={n: data_dir / n for n in TOKEN_FILES},
        config=config,
        code=__name__,
        label=f"{data_dir.name}-{config.preset}",
        out_dir=out_dir,
        force=force,
    )


@replicated
def pretrain(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    config: PretrainConfig | None = None,
    *,
    tokenizer: Any = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
    progress: bool = True,
    force: bool = False,
) -> LMResult:
    """Train a `config.preset` model on `data_dir/{train,val}.bin` into the stage folder (`out_dir`, else named
    by the stage contract; `force`: it may hold files gptflow did not write). Reused, resumed or run as the stage
    contract decides. `tokenizer` (tiktoken) enables
    text samples at each evaluation; `on_log` receives every train/eval record."""
    config = config or PretrainConfig()
    stage = pretrain_stage(data_dir, config, out_dir, force)
    return run_lm_stage(
        stage, resume, lambda ckpt: _train(stage, ckpt, Path(data_dir), config, tokenizer, on_log, progress)
    )


def _train(
    stage: Stage,
    checkpoint: TrainingCheckpoint,
    data_dir: Path,
    config: PretrainConfig,
    tokenizer: Any,
    on_log: Callable[[dict[str, Any]], None] | None,
    progress: bool,
) -> Built:
    train_tokens, val_tokens = (load_tokens(data_dir / name) for name in TOKEN_FILES)
    torch.manual_seed(config.seed)
    model = GPTModel(config.model_config_for())
    ctx = model.cfg.context_length
    windows = TokenWindows(train_tokens, ctx, config.batch_size, config.sampling, config.seed)
    features = torch.compile(model.features) if config.compile else model.features  # the fused loss stays eager

    def loss(batch):
        x, y = batch
        return lm_loss(features(x), model.head_weight(), y), {"tokens": x.numel()}

    def validate(final: bool) -> dict[str, Any]:
        val = evaluate(model, val_tokens, ctx, config.batch_size, config.eval_batches, config.runtime().precision)
        metrics: dict[str, Any] = {"val_loss": val, "val_ppl": math.exp(min(val, 50))}
        if tokenizer is not None and config.sample_tokens:
            metrics["sample"] = sample_text(model, tokenizer, config.sample_prompt, config.sample_tokens)
        return metrics

    state = train(
        model,
        config,
        stage=stage,
        checkpoint=checkpoint,
        total_steps=config.steps,
        batch=windows.batch,
        loss=loss,
        evaluate=validate,
        on_log=on_log,
        progress=progress,
    )
    last_eval = next((h for h in reversed(state.history) if h["kind"] == "eval"), {})
    return finish_lm_stage(stage, model, state, data_dir=data_dir, val_ppl=last_eval.get("val_ppl"))


def sample_text(model: GPTModel, tokenizer: Any, prompt: str, n_tokens: int) -> str:
    ids = tokenizer.encode(prompt, allowed_special="all") or [50256]
    device = next(model.parameters()).device
    out = generate(model, torch.tensor([ids], device=device), n_tokens, temperature=0.0)
    return tokenizer.decode(out[0, len(ids) :].tolist())
