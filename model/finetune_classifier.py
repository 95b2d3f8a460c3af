"""Fine-tuning a classifier (the book's chapter 6) through the one training loop (model.training): its config,
its stage, domain-adaptive pretraining before it (model.dapt), and the one-checkpoint ensemble of several.

Outputs in the stage folder: `best.pt` (the kept weights: best validation accuracy, or the final ones),
`last.pt` (resumable), `history.json` and the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gptflow.splits import LABELLED_FILES, read_labelled, read_labels
from gptflow.stage import Built, Stage
from gptflow.storage import read_json, write_json_atomic
from model import lora
from model.checkpoint import load_checkpoint, save_checkpoint
from model.classifier import (
    BEST,
    ENSEMBLE_FORMAT,
    FORMAT,
    ClassifierError,
    SequenceClassifier,
    classifier_from_state,
    collate,
    encode_split,
    evaluate_split,
    save_classifier,
)
from model.configs import ClassifierConfig
from model.dapt import corpus_tokens, dapt_stage, domain_pretrain
from model.distributed import replicated
from model.pretrain import LMResult
from model.training import (
    CHECKPOINT,
    EpochBatches,
    Selection,
    TrainingCheckpoint,
    train,
)

log = logging.getLogger(__name__)

HISTORY = "history.json"
# best.pt is written before the training checkpoint, which cannot recreate it: it must load for its stage folder to
# be reused or resumed (gptflow.stage readers).
BEST_READER = {BEST: lambda path: load_checkpoint(path, mmap=True)}


@dataclass
class FinetuneResult:
    out_dir: Path
    best: Path
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    reused: bool = False


def classifier_stage(
    data_dir: str | Path, config: ClassifierConfig, out_dir: str | Path | None = None, settings=None, force=False
) -> Stage:
    data_dir = Path(data_dir)
    config.check_lora()
    read_labels(data_dir)  # a missing or bad data folder: its own message before anything is hashed
    inputs: dict[str, Path | str] = {n: data_dir / n for n in LABELLED_FILES}
    inputs["init"] = config.start_input(settings)
    return Stage.declare(
        "classify",
        inputs=inputs,
        config=config,
        code=__name__,
        out_dir=out_dir,
        force=force,
        label=label if (label := config.model_label()).startswith(data_dir.name) else f"{data_dir.name}-{label}",
    )


@replicated
def finetune(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    config: ClassifierConfig | None = None,
    *,
    tokenizer=None,
    settings=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
    force: bool = False,
) -> FinetuneResult:
    """Fine-tune on `data_dir/{train,validation}.csv` + `labels.json`; keep the best-validation-accuracy weights
    (or, with `config.keep="last"`, the final ones) in `best.pt`, the resumable state in `last.pt` and the
    history, in the stage folder (`out_dir`, else named by the stage contract, which also decides reuse and
    resume; `force`: `out_dir` may hold files gptflow did not write). Texts are read with the starting model's own
    tokenizer (`tokenizer`: GPT-2's, for a model that keeps none), which `best.pt` keeps."""
    config = config or ClassifierConfig()
    stage = classifier_stage(data_dir, config, out_dir, settings, force)
    checkpoint = TrainingCheckpoint(stage.dir / CHECKPOINT)
    result = stage.run(
        lambda decision: _finetune(stage, checkpoint, Path(data_dir), config, tokenizer, settings, on_log),
        resume=resume,
        checkpoint=checkpoint.stage_key,
        readers=BEST_READER,
    )
    history = read_json(stage.dir / HISTORY) if result.reused else result.value
    return FinetuneResult(stage.dir, stage.dir / BEST, history, result.metrics, result.reused)


def _finetune(
    stage: Stage,
    checkpoint: TrainingCheckpoint,
    data_dir: Path,
    config: ClassifierConfig,
    tokenizer,
    settings,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> Built:
    labels = read_labels(data_dir)
    if config.dapt is not None or config.ensemble:
        raise ClassifierError(
            "finetune trains one classifier: pretrain it with pretrain_domain first (dapt) and train an ensemble's "
            "members one by one (ClassifierConfig.members), as the finetune-classifier flow does"
        )
    tokenizer = config.init.tokenizer(settings, tokenizer)
    backbone = config.start_model(config.dropout, settings)
    source = (
        {"init": "random", "preset": config.model_label()}
        if config.init.kind == "random"
        else {"init": str(config.init), "sha256": stage.inputs["init"]}
    )
    max_length = min(config.max_length or backbone.cfg.context_length, backbone.cfg.context_length)
    train_split = encode_split(read_labelled(data_dir / "train.csv", labels), tokenizer, max_length)
    val = encode_split(read_labelled(data_dir / "validation.csv", labels), tokenizer, max_length)
    torch.manual_seed(config.seed)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    model = SequenceClassifier(backbone, len(labels), config.pooling, pad_id)
    if (spec := config.lora_spec()) is not None:  # adapters on the frozen backbone, and the new head
        base = lora.base_record(config.init, stage.inputs["init"], settings)
        n_trainable = lora.apply_lora(model, spec, base)
    else:
        n_trainable = model.set_trainable(config.trainable, config.last_k)
    order = EpochBatches(len(train_split), config.batch_size, config.seed)
    steps_per_epoch = max(1, order.per_epoch // (config.grad_accum * config.world_size))
    log.info(
        "finetune: %d classes, %d train / %d validation texts, %d trainable parameters",
        len(labels),
        len(train_split),
        len(val),
        n_trainable,
    )

    def batch(i: int):
        idx = order.indices(i)
        return collate([train_split.ids[j] for j in idx], [train_split.labels[j] for j in idx], pad_id)

    def loss(tensors):
        x, mask, y = tensors
        logits = model(x, mask)
        return F.cross_entropy(logits.float(), y), {
            "tokens": int(mask.sum()),
            "n": len(y),
            "correct": int((logits.argmax(1) == y).sum()),
        }

    files = tokenizer.files  # None for GPT-2's BPE
    if files:
        checkpoint.extra = {"tokenizer": files}

    def keep(state) -> None:
        save_classifier(
            stage.dir / BEST,
            model,
            labels,
            max_length,
            source,
            tokenizer=files,
            step=state.step,
            data_dir=str(data_dir.resolve()),
        )

    select = Selection("val_accuracy", "max", "last" if config.keep == "last" else "best", config.patience)
    state = train(
        model,
        config,
        stage=stage,
        checkpoint=checkpoint,
        total_steps=steps_per_epoch * config.epochs,
        batch=batch,
        loss=loss,
        evaluate=lambda final: evaluate_split(model, val, config.eval_batch_size, config.runtime().precision),
        steps_per_epoch=steps_per_epoch,
        select=select,
        on_best=keep,
        on_log=on_log,
    )
    kept = next(h for h in state.history if h["kind"] == "eval" and h["step"] == state.best_step)
    # best_*: the kept weights (the best validation accuracy, or the schedule's end with keep="last")
    summary = {
        "keep": config.keep,
        "steps": state.step,
        "best_step": state.best_step,
        "best_val_accuracy": kept["val_accuracy"],
        "best_val_loss": kept["val_loss"],
        "early_stopped": state.stopped_early,
        "trainable_params": n_trainable,
        **({"lora": lora.summary(model)} if lora.is_lora(model) else {}),
        "max_length": max_length,
        "n_classes": len(labels),
        **state.setup,
        "source": source,
    }
    write_json_atomic(stage.dir / HISTORY, state.history)
    return Built([BEST, CHECKPOINT, HISTORY], summary, state.history)


def domain_stage(
    data_dir: str | Path,
    config: ClassifierConfig,
    out_dir: str | Path | None = None,
    *,
    tokenizer=None,
    settings=None,
    force: bool = False,
) -> tuple[Stage, np.ndarray]:
    """The `dapt` stage of `config` (its `dapt` knobs, run settings and seed) and its corpus, the texts of
    `data_dir` as tokens."""
    if config.dapt is None:
        raise ClassifierError("domain-adaptive pretraining needs a config with dapt set")
    config.check_lora()
    tokens = corpus_tokens(data_dir, config.init.tokenizer(settings, tokenizer))
    train_config = config.dapt.train_config(config)
    return dapt_stage(
        data_dir, config.start_input(settings), train_config, config.model_label(), tokens, out_dir, force
    ), tokens


@replicated
def pretrain_domain(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    config: ClassifierConfig | None = None,
    *,
    tokenizer=None,
    settings=None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
    force: bool = False,
) -> LMResult:
    """Domain-adaptive pretraining of the model `config` starts from, on the texts of `data_dir`, in its stage
    folder (`out_dir`, else named by the stage contract); `config.after_dapt(result.model_path)` fine-tunes
    from the result, which keeps the starting model's tokenizer (its texts are read with it)."""
    config = config or ClassifierConfig()
    stage, tokens = domain_stage(data_dir, config, out_dir, tokenizer=tokenizer, settings=settings, force=force)
    return domain_pretrain(
        stage,
        lambda: config.start_model(config.dapt.dropout, settings),
        tokens,
        config.dapt.train_config(config),
        on_log=on_log,
        resume=resume,
        tokenizer_files=config.init.tokenizer_files(settings),
        base=lora.base_record(config.init, stage.inputs["start"], settings)
        if config.dapt.trainable == "lora"
        else None,
    )


def build_ensemble(
    data_dir: str | Path,
    members: Sequence[dict[str, Any]],
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    force: bool = False,
) -> FinetuneResult:
    """One classifier checkpoint (`best.pt`, format ENSEMBLE_FORMAT) holding every member's weights, for
    `members`: {"best": a member's best.pt, "metrics": {split: {"accuracy": ...}}} from the same data folder. A
    stage keyed on the members' files: rebuilding it after a member changed is automatic."""
    data_dir = Path(data_dir)
    labels = read_labels(data_dir)
    paths = [Path(m["best"]) for m in members]
    stage = Stage.declare(
        "classify",
        inputs={f"member{i}": path for i, path in enumerate(paths)},
        config={"ensemble": "mean class probability", "members": len(paths)},
        code=__name__,
        out_dir=out_dir,
        force=force,
        label=f"{data_dir.name}-ensemble{len(paths)}",
    )
    result = stage.run(
        lambda decision: _write_ensemble(stage, data_dir, labels, paths, members), resume=resume, readers=BEST_READER
    )
    return FinetuneResult(stage.dir, stage.dir / BEST, [], result.metrics, result.reused)


def _write_ensemble(stage: Stage, data_dir: Path, labels: dict[str, int], paths: list[Path], members) -> Built:
    """The ensemble checkpoint of `members` (their best.pt files `paths`) in the stage folder."""
    entries, tokenizers = [], []
    for i, (path, member) in enumerate(zip(paths, members)):
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != FORMAT:
            raise ClassifierError(f"ensemble member {path} is not a single classifier checkpoint ({FORMAT!r})")
        if "lora" in ckpt:  # the ensemble holds plain weights: a LoRA member's adapters are merged into its base
            merged = classifier_from_state(ckpt, path).model
            ckpt = {**ckpt, "model": merged.state_dict(), "config": merged.cfg.to_dict()}
        if ckpt["labels"] != labels:
            raise ClassifierError(f"ensemble member {path}: labels {ckpt['labels']} differ from {labels}")
        tokenizers.append(ckpt.get("tokenizer") or None)
        if tokenizers[-1] != tokenizers[0]:
            raise ClassifierError(
                f"ensemble member {path} reads text with another tokenizer than {paths[0]}: an ensemble's members "
                "must share one vocabulary"
            )
        accuracy = {split: m["accuracy"] for split, m in member.get("metrics", {}).items()}
        info = {"checkpoint": str(path), "sha256": stage.inputs[f"member{i}"], "accuracy": accuracy}
        keys = ("config", "model", "pooling", "max_length", "source", "pad_id")
        entries.append({k: ckpt[k] for k in keys if k in ckpt} | info)
    summary = {"members": [{k: e[k] for k in ("checkpoint", "sha256", "accuracy")} for e in entries]}
    save_checkpoint(
        stage.dir / BEST,
        format=ENSEMBLE_FORMAT,
        members=entries,
        labels=labels,
        max_length=min(e["max_length"] for e in entries),
        data_dir=str(data_dir.resolve()),
        **({"tokenizer": tokenizers[0]} if tokenizers[0] else {}),
    )
    return Built([BEST], summary)
