"""Sequence classification on a GPT backbone: model, data, fine-tuning loop with early stopping and resume.

The head reads the hidden state of the last real token of each (right-padded) row, found with a gather on
`attention_mask.sum(1) - 1`: no Python branch on tensor values, so the model exports with dynamic batch and
sequence axes. Causal attention means a real token never sees the padding after it, so the backbone needs no
padding mask. The book's variant (the last position, padding included) is `pooling="last_position"`;
`pooling="mean"` averages the hidden states of the real tokens (a masked sum over a count: no branches either),
which reads every token of a short message rather than one.

Classifier checkpoints: {"format": FORMAT, "config": GPTConfig dict, "model": state_dict (backbone.* +
head.*), "labels": {name: id}, "pooling", "max_length", "source": {init, sha256}}. The LM head is dropped:
the classifier neither trains, saves nor exports it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from edge.text import PAD_ID, encode_texts, pad_batch
from gptflow.errors import GptflowError
from gptflow.storage import completed_manifest, read_json, sha256_file, source_digest, write_json_atomic, write_manifest
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import GPTConfig
from model.gpt import GPTModel
from model.init import INIT_HELP, build_init_model, init_file, init_label, validate_init
from model.training import (
    TrainState,
    autocast,
    build_optimizer,
    build_scheduler,
    check_finite,
    eval_mode,
    load_training_checkpoint,
    save_training_checkpoint,
    set_threads,
)

# The code that makes this stage's outputs: part of its cache key (see gptflow.storage.source_digest).
CODE = source_digest(__name__, "model.gpt", "model.training", "model.init", "edge.text")

log = logging.getLogger(__name__)

FORMAT = "gptflow-classifier/1"
STAGE = "classify"
CHECKPOINT = "last.pt"  # full training state, resumable
BEST = "best.pt"  # classifier weights at the best validation accuracy
HISTORY = "history.json"
CURVES = "curves.png"
SPLIT_FILES = ("train.csv", "validation.csv", "test.csv", "labels.json")

Pooling = Literal["last_real", "last_position", "mean"]
Trainable = Literal["head", "last_k", "all"]
Keep = Literal["best_val", "last"]


class ClassifierError(GptflowError, ValueError):
    """Classifier input, init spec or checkpoint is unusable; the message names it."""


class ClassifierConfig(BaseModel):
    """Every knob of a fine-tuning run (also the flow's parameters and the manifest's config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    init: str = Field(default="random", description=INIT_HELP)
    preset: str = Field(default="mini", description="model preset for init=random")
    pooling: Pooling = "last_real"
    trainable: Trainable = Field(default="last_k", description="head | last_k (last k blocks + final norm + "
                                 "head) | all")
    last_k: int = Field(default=1, ge=1)
    max_length: int | None = Field(default=None, gt=0, description="truncate texts (default: context length)")
    epochs: int = Field(default=5, gt=0)
    eval_every: int | None = Field(default=None, gt=0, description="validate every N steps (default: per epoch)")
    patience: int | None = Field(default=3, gt=0, description="stop after N evaluations without improvement")
    keep: Keep = Field(default="best_val", description="best_val: the weights at the best validation accuracy "
                       "(early stopping); last: the weights at the end of the schedule, for a validation split too "
                       "small to pick a step by (no early stopping)")
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=1.0, ge=0, le=1, description="1.0: constant LR after warmup (the book)")
    grad_clip: float | None = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, gt=0)
    eval_batch_size: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 123
    bf16: bool = Field(default=False, description="bf16 autocast on CPU (faster, slightly noisier)")
    threads: int | None = Field(default=None, gt=0)

    @field_validator("init")
    @classmethod
    def _init_spec(cls, value: str) -> str:
        return validate_init(value)

    @model_validator(mode="before")
    @classmethod
    def _keep_last_runs_the_schedule(cls, values: Any) -> Any:
        """keep="last" trains the whole schedule: no early stopping unless asked for (then it is an error)."""
        if isinstance(values, dict) and values.get("keep") == "last":
            if values.get("patience") is not None:
                raise ValueError("keep='last' trains the whole schedule: patience (early stopping) must be None")
            values = {**values, "patience": None}
        return values

    def init_label(self) -> str:
        """Short name of the starting point, for folder names."""
        return init_label(self.init, self.preset)

    def resume_key(self) -> dict[str, Any]:
        """Fields a resumed run must share with its checkpoint."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in {"threads", "eval_batch_size"}}


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: GPTModel, n_classes: int, pooling: Pooling = "last_real") -> None:
        super().__init__()
        if n_classes < 2:
            raise ClassifierError(f"a classifier needs at least 2 classes, got {n_classes}")
        if hasattr(backbone, "out_head"):
            del backbone.out_head  # unused: features() stops at the final norm
        self.backbone = backbone
        self.cfg = backbone.cfg
        self.pooling = pooling
        self.head = nn.Linear(backbone.cfg.emb_dim, n_classes)

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes) for right-padded `input_ids` (B, T); `attention_mask` 1 on real tokens."""
        hidden = self.backbone.features(input_ids)
        if self.pooling == "last_real":
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
            index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            pooled = hidden.gather(1, index).squeeze(1)
        elif self.pooling == "mean":
            real = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        else:
            pooled = hidden[:, -1]
        return self.head(pooled)

    def set_trainable(self, part: Trainable, last_k: int = 1) -> int:
        """Freeze everything but `part`; returns the number of trainable parameters."""
        for p in self.parameters():
            p.requires_grad = part == "all"
        if part != "all":
            trainable: list[nn.Module] = [self.head]
            if part == "last_k":
                if last_k > len(self.backbone.blocks):
                    raise ClassifierError(f"last_k {last_k} exceeds the model's {len(self.backbone.blocks)} blocks")
                trainable += [*self.backbone.blocks[-last_k:], self.backbone.final_norm]
            for module in trainable:
                for p in module.parameters():
                    p.requires_grad = True
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class LabelledTexts:
    """A split as token ids (truncated, never empty) and integer labels."""

    ids: list[list[int]]
    labels: list[int]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def read_split(path: Path, labels: dict[str, int]) -> pd.DataFrame:
    if not path.is_file():
        raise ClassifierError(f"split file {path} does not exist; run `gptflow data spam` or `gptflow data csv` first")
    df = pd.read_csv(path, dtype={"text": str}, keep_default_na=False)
    if list(df.columns[:2]) != ["text", "label"]:
        raise ClassifierError(f"{path}: expected columns text,label; found {list(df.columns)}")
    bad = ~df["label"].isin(list(labels.values()))
    if bad.any():
        raise ClassifierError(f"{path}: label {df['label'][bad].iloc[0]} (row {int(bad.idxmax()) + 2}) is not one "
                              f"of the ids in labels.json {sorted(labels.values())}")
    return df


def load_labels(data_dir: Path) -> dict[str, int]:
    path = data_dir / "labels.json"
    if not path.is_file():
        raise ClassifierError(f"{path} does not exist; run `gptflow data spam` or `gptflow data csv` first")
    labels = read_json(path)
    if sorted(labels.values()) != list(range(len(labels))):
        raise ClassifierError(f"{path}: ids must be 0..{len(labels) - 1}, got {sorted(labels.values())}")
    return labels


def encode_split(df: pd.DataFrame, tokenizer, max_length: int) -> LabelledTexts:
    texts = df["text"].tolist()
    return LabelledTexts(encode_texts(tokenizer, texts, max_length), df["label"].astype(int).tolist(), texts)


def collate(rows: Sequence[Sequence[int]], labels: Sequence[int] | None = None,
            pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask, labels) padded to the longest row of this batch (dynamic padding)."""
    input_ids, mask = pad_batch(rows, pad_id)
    target = torch.tensor(list(labels), dtype=torch.long) if labels is not None else None
    return torch.from_numpy(input_ids), torch.from_numpy(mask), target


def batches(data: LabelledTexts, order: Sequence[int], batch_size: int):
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield collate([data.ids[j] for j in idx], [data.labels[j] for j in idx])


@torch.no_grad()
def predict_logits(model: SequenceClassifier, ids: Sequence[Sequence[int]], batch_size: int = 32,
                   bf16: bool = False) -> np.ndarray:
    """Logits (N, n_classes) in the input order; batches of similar length pad least."""
    order = np.argsort([len(r) for r in ids], kind="stable")
    out = np.zeros((len(ids), model.n_classes), dtype=np.float32)
    with eval_mode(model), autocast(bf16):
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, mask, _ = collate([ids[j] for j in idx])
            out[idx] = model(x, mask).float().numpy()
    return out


def evaluate_split(model: SequenceClassifier, data: LabelledTexts, batch_size: int, bf16: bool = False) -> dict:
    logits = predict_logits(model, data.ids, batch_size, bf16)
    target = torch.tensor(data.labels)
    loss = F.cross_entropy(torch.from_numpy(logits), target).item()
    accuracy = float((logits.argmax(1) == np.asarray(data.labels)).mean())
    return {"loss": loss, "accuracy": accuracy}


# --------------------------------------------------------------------------------------- model build


def build_backbone(config: ClassifierConfig, settings=None) -> tuple[GPTModel, dict[str, str]]:
    """The backbone named by `config.init`, and where it came from ({init, sha256} or {init, preset})."""
    model = build_init_model(config.init, config.preset, dropout=config.dropout, seed=config.seed,
                             settings=settings)
    path = init_file(config.init, settings)
    source = {"init": "random", "preset": config.preset} if path is None else {"init": config.init,
                                                                                "sha256": sha256_file(path)}
    return model, source


def save_classifier(path: str | Path, model: SequenceClassifier, labels: dict[str, int], max_length: int,
                    source: dict[str, str], **extra: Any) -> Path:
    return save_checkpoint(path, format=FORMAT, config=model.cfg.to_dict(), model=model.state_dict(),
                           labels=labels, pooling=model.pooling, max_length=max_length, source=source, **extra)


@dataclass
class LoadedClassifier:
    model: SequenceClassifier
    labels: dict[str, int]
    max_length: int
    source: dict[str, str]
    path: Path
    data_dir: str | None  # the data stage folder it was fine-tuned on

    @property
    def names(self) -> list[str]:
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]


def load_classifier(path: str | Path) -> LoadedClassifier:
    """A classifier checkpoint (best.pt, or a fine-tuning folder holding one) in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gptflow classifier checkpoint (expected format {FORMAT!r}); "
                              "fine-tune one with `gptflow finetune-classifier`")
    model = SequenceClassifier(GPTModel(GPTConfig.from_dict(ckpt["config"])), len(ckpt["labels"]), ckpt["pooling"])
    model.load_state_dict(ckpt["model"])
    return LoadedClassifier(model.eval(), dict(ckpt["labels"]), int(ckpt["max_length"]), dict(ckpt["source"]), path,
                            ckpt.get("data_dir"))


# ------------------------------------------------------------------------------------------ training


@dataclass
class FinetuneResult:
    out_dir: Path
    best: Path
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    reused: bool = False


@dataclass
class _Progress:
    """Where the run is inside the data: this epoch's shuffled order and the next batch."""

    epoch: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)
    best_accuracy: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    run_loss: float = 0.0  # sums over the batches since the last evaluation
    run_correct: int = 0
    run_seen: int = 0


def finetune(
    data_dir: str | Path,
    out_dir: str | Path,
    config: ClassifierConfig | None = None,
    *,
    tokenizer,
    settings=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
) -> FinetuneResult:
    """Fine-tune on `data_dir/{train,validation}.csv` + `labels.json`; keep the best-validation-accuracy
    weights (or, with `config.keep="last"`, the final ones) in `out_dir/best.pt`, the resumable state in
    `out_dir/last.pt`, curves and a manifest. A finished run with the same data and config is reused; an
    unfinished one resumes."""
    config = config or ClassifierConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    labels = load_labels(data_dir)
    inputs = {name: sha256_file(data_dir / name) for name in SPLIT_FILES if (data_dir / name).is_file()}
    if resume and (done := completed_manifest(out_dir, inputs, config.resume_key(), code=CODE)) is not None:
        log.info("finetune: reusing %s (same data and config)", out_dir)
        return FinetuneResult(out_dir, out_dir / BEST, read_json(out_dir / HISTORY), done["metrics"], reused=True)

    set_threads(config.threads)
    backbone, source = build_backbone(config, settings)
    max_length = min(config.max_length or backbone.cfg.context_length, backbone.cfg.context_length)
    train = encode_split(read_split(data_dir / "train.csv", labels), tokenizer, max_length)
    val = encode_split(read_split(data_dir / "validation.csv", labels), tokenizer, max_length)
    torch.manual_seed(config.seed)
    model = SequenceClassifier(backbone, len(labels), config.pooling)
    n_trainable = model.set_trainable(config.trainable, config.last_k)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    generator = torch.Generator().manual_seed(config.seed)
    state, progress = TrainState(), _Progress()

    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        stored = load_checkpoint(ckpt_path).get("classifier_config")
        if stored is None or ClassifierConfig(**stored).resume_key() != config.resume_key():
            raise ClassifierError(f"{ckpt_path} was written by a run with a different config; pass another output "
                                  "folder, or --no-resume to start over")
        state, ckpt = load_training_checkpoint(ckpt_path, model, optimizer, scheduler)
        generator.set_state(ckpt["generator"])
        progress = _Progress(**{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in ckpt["progress"].items()})
        log.info("finetune: resumed from %s at step %d", ckpt_path, state.step)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("finetune: %d classes, %d train / %d validation texts, %d trainable parameters",
             len(labels), len(train), len(val), n_trainable)

    def checkpoint() -> None:
        save_training_checkpoint(
            ckpt_path, model, optimizer, scheduler, state, generator=generator.get_state(),
            progress={**progress.__dict__, "order": torch.tensor(progress.order, dtype=torch.long)},
            classifier_config=config.model_dump(mode="json"))

    def emit(metrics: dict[str, Any]) -> None:
        state.history.append(metrics)
        if on_log is not None:
            on_log(dict(metrics))

    stop = False
    model.train()
    while progress.epoch < config.epochs and not stop:
        if not progress.order:
            progress.order = torch.randperm(len(train), generator=generator).tolist()
        while progress.position < len(progress.order):
            idx = progress.order[progress.position:progress.position + config.batch_size]
            x, mask, y = collate([train.ids[j] for j in idx], [train.labels[j] for j in idx])
            with autocast(config.bf16):
                logits = model(x, mask)
            loss = F.cross_entropy(logits.float(), y)
            check_finite(loss, state.step + 1, f"fine-tuning (last good checkpoint: {ckpt_path})")
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            state.tokens_seen += int(mask.sum())
            progress.position += len(idx)
            progress.run_loss += loss.item() * len(idx)
            progress.run_correct += int((logits.argmax(1) == y).sum())
            progress.run_seen += len(idx)
            epoch_end = progress.position >= len(progress.order)
            if epoch_end:
                progress.epoch, progress.position, progress.order = progress.epoch + 1, 0, []
            if (config.eval_every and state.step % config.eval_every == 0) or (not config.eval_every and epoch_end) \
                    or state.step == total_steps:
                result = evaluate_split(model, val, config.eval_batch_size, config.bf16)
                model.train()
                if config.keep == "last":
                    improved = state.step == total_steps
                else:
                    improved = result["accuracy"] > progress.best_accuracy
                if improved:
                    progress.best_accuracy, progress.best_step, progress.bad_evals = result["accuracy"], state.step, 0
                    state.best_val_loss = result["loss"]
                    save_classifier(out_dir / BEST, model, labels, max_length, source, step=state.step,
                                    data_dir=str(data_dir.resolve()))
                else:
                    progress.bad_evals += 1
                emit({"step": state.step, "epoch": state.step / steps_per_epoch,
                      "train_loss": progress.run_loss / max(progress.run_seen, 1),
                      "train_accuracy": progress.run_correct / max(progress.run_seen, 1),
                      "val_loss": result["loss"], "val_accuracy": result["accuracy"], "best": improved,
                      "lr": scheduler.get_last_lr()[0]})
                progress.run_loss, progress.run_correct, progress.run_seen = 0.0, 0, 0
                stop = config.patience is not None and progress.bad_evals >= config.patience
                checkpoint()
                if stop:
                    log.info("finetune: early stop at step %d (best step %d)", state.step, progress.best_step)
                    break

    # best_*: the kept weights (the best validation accuracy, or the schedule's end with keep="last")
    summary = {"keep": config.keep, "steps": state.step, "best_step": progress.best_step,
               "best_val_accuracy": progress.best_accuracy,
               "best_val_loss": state.best_val_loss, "early_stopped": stop, "trainable_params": n_trainable,
               "max_length": max_length, "n_classes": len(labels), "source": source}
    write_json_atomic(out_dir / HISTORY, state.history)
    from eval.plots import plot_training_curves

    plot_training_curves(state.history, out_dir / CURVES, title=f"fine-tuning ({config.init})")
    write_manifest(out_dir, stage=STAGE, inputs=inputs, config=config.resume_key(),
                   outputs=[BEST, CHECKPOINT, HISTORY, CURVES], metrics=summary, code=CODE)
    return FinetuneResult(out_dir, out_dir / BEST, state.history, summary)


METRICS = "metrics.json"
CONFUSION = "confusion_test.png"


def evaluate_classifier(model_path: str | Path, data_dir: str | Path, out_dir: str | Path, *, tokenizer,
                        batch_size: int = 32) -> dict[str, Any]:
    """Train/validation/test reports (accuracy, per-class P/R/F1, confusion matrix, ROC-AUC for 2 classes) of a
    classifier checkpoint, written to `out_dir/metrics.json`, with the test confusion matrix as a PNG."""
    from eval.metrics import classification_report
    from eval.plots import plot_confusion_matrix

    loaded = load_classifier(model_path)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    labels = load_labels(data_dir)
    if labels != loaded.labels:
        raise ClassifierError(f"{data_dir}/labels.json {labels} differs from the checkpoint's labels {loaded.labels}")
    reports = {}
    for split in ("train", "validation", "test"):
        data = encode_split(read_split(data_dir / f"{split}.csv", labels), tokenizer, loaded.max_length)
        reports[split] = classification_report(data.labels, predict_logits(loaded.model, data.ids, batch_size),
                                               loaded.names)
    write_json_atomic(out_dir / METRICS, {"checkpoint": str(loaded.path), "reports": reports})
    plot_confusion_matrix(reports["test"]["confusion_matrix"]["matrix"], loaded.names, out_dir / CONFUSION,
                          title=f"test confusion matrix (accuracy {100 * reports['test']['accuracy']:.2f}%)")
    return reports
