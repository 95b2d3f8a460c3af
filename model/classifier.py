"""Sequence classification on a GPT backbone: the model, its checkpoint format, and scoring a data folder.

The head reads the hidden state of the last real token of each (right-padded) row, found with a gather on
`attention_mask.sum(1) - 1`: no Python branch on tensor values, so the model exports with dynamic batch and
sequence axes. Causal attention means a real token never sees the padding after it, so the backbone needs no
padding mask. The book's variant (the last position, padding included) is `pooling="last_position"`;
`pooling="mean"` averages the hidden states of the real tokens (a masked sum over a count: no branches either),
which reads every token of a short message rather than one.

Classifier checkpoints: {"format": FORMAT, "config": GPTConfig dict, "model": state_dict (backbone.* +
head.*), "labels": {name: id}, "pooling", "max_length", "source": {init, sha256}, "pad_id", and "tokenizer" (the
backbone's tokenizer files) where the backbone has its own vocabulary}. The LM head is dropped: the classifier
neither trains, saves nor exports it. Fine-tuning is `model.finetune_classifier`. Any family's backbone works
(GPT-2, Llama, Qwen3): the parts the book's recipe trains (the last blocks, the final norm, the new head) have the
same names in each. Rows are padded with the backbone tokenizer's pad id (GPT-2: 50256, as the book).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from edge.text import PAD_ID, encode_texts, pad_batch
from gptflow.errors import GptflowError
from gptflow.splits import read_labelled, read_labels
from model import lora
from model.checkpoint import CheckpointError, check_finite_weights, save_checkpoint
from model.config import GPTConfig
from model.configs import Pooling, Trainable
from model.device import autocast
from model.gpt import GPTModel
from model.training import (
    eval_mode,
)

log = logging.getLogger(__name__)

FORMAT = "gptflow-classifier/1"
ENSEMBLE_FORMAT = "gptflow-classifier-ensemble/1"
BEST = "best.pt"  # classifier weights kept (best validation accuracy, or the final ones)


class ClassifierError(GptflowError, ValueError):
    """Classifier input, init spec or checkpoint is unusable; the message names it."""


class SequenceClassifier(nn.Module):
    def __init__(
        self, backbone: GPTModel, n_classes: int, pooling: Pooling = "last_real", pad_id: int = PAD_ID
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ClassifierError(f"a classifier needs at least 2 classes, got {n_classes}")
        if hasattr(backbone, "out_head"):
            del backbone.out_head  # unused: features() stops at the final norm
        self.backbone = backbone
        self.cfg = backbone.cfg
        self.pooling = pooling
        self.pad_id = int(pad_id)  # what rows are padded with (its tokenizer's pad token)
        self.head = nn.Linear(backbone.cfg.emb_dim, n_classes)

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits (B, n_classes) for right-padded `input_ids` (B, T); `attention_mask` 1 on real tokens."""
        return self.head(self.pool(self.backbone.features(input_ids), attention_mask))

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The one vector per row (B, E) the head reads from hidden states (B, T, E)."""
        if self.pooling == "last_real":
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
            index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            return hidden.gather(1, index).squeeze(1)
        if self.pooling == "mean":
            real = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        return hidden[:, -1]

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


class ClassifierEnsemble(nn.Module):
    """Classifiers whose class probabilities are averaged. `forward` returns the log of that mean: softmax and
    argmax read it like logits, so everything that runs a classifier (evaluation, ONNX export, the edge runtime)
    runs an ensemble unchanged, as one graph."""

    def __init__(self, members: Sequence[SequenceClassifier]) -> None:
        super().__init__()
        if len({m.n_classes for m in members}) != 1:
            raise ClassifierError(
                f"ensemble members disagree on the number of classes: {[m.n_classes for m in members]}"
            )
        self.members = nn.ModuleList(members)

    @property
    def n_classes(self) -> int:
        return self.members[0].n_classes

    @property
    def cfg(self) -> GPTConfig:
        """The shape an input must fit: the first member's, with the shortest context of all."""
        context = min(m.cfg.context_length for m in self.members)
        return self.members[0].cfg.model_copy(update={"context_length": context})

    @property
    def pooling(self) -> str:
        return "+".join(dict.fromkeys(m.pooling for m in self.members))

    @property
    def pad_id(self) -> int:
        return self.members[0].pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([F.log_softmax(m(input_ids, attention_mask).float(), -1) for m in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))


# ----------------------------------------------------------------------------------------------- data


@dataclass
class LabelledTexts:
    """A split as token ids (truncated, never empty) and integer labels."""

    ids: list[list[int]]
    labels: list[int]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def encode_split(df: pd.DataFrame, tokenizer, max_length: int) -> LabelledTexts:
    texts = df["text"].tolist()
    return LabelledTexts(encode_texts(tokenizer, texts, max_length), df["label"].astype(int).tolist(), texts)


def collate(
    rows: Sequence[Sequence[int]], labels: Sequence[int] | None = None, pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask, labels) padded with `pad_id` to the longest row of this batch (dynamic padding)."""
    input_ids, mask = pad_batch(rows, pad_id)
    target = torch.tensor(list(labels), dtype=torch.long) if labels is not None else None
    return torch.from_numpy(input_ids), torch.from_numpy(mask), target


@torch.no_grad()
def predict_logits(
    model: SequenceClassifier, ids: Sequence[Sequence[int]], batch_size: int = 32, precision: str = "fp32"
) -> np.ndarray:
    """Logits (N, n_classes) in the input order, on the model's device; batches of similar length pad least (with
    the model's pad id)."""
    order = np.argsort([len(r) for r in ids], kind="stable")
    out = np.zeros((len(ids), model.n_classes), dtype=np.float32)
    device = next(model.parameters()).device
    with eval_mode(model), autocast(precision, device):
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x, mask, _ = collate([ids[j] for j in idx], pad_id=getattr(model, "pad_id", PAD_ID))
            out[idx] = model(x.to(device), mask.to(device)).float().cpu().numpy()
    return out


def evaluate_split(model: SequenceClassifier, data: LabelledTexts, batch_size: int, precision: str = "fp32") -> dict:
    logits = predict_logits(model, data.ids, batch_size, precision)
    target = torch.tensor(data.labels)
    loss = F.cross_entropy(torch.from_numpy(logits), target).item()
    accuracy = float((logits.argmax(1) == np.asarray(data.labels)).mean())
    return {"val_loss": loss, "val_accuracy": accuracy}


# --------------------------------------------------------------------------------------- model build


def save_classifier(
    path: str | Path,
    model: SequenceClassifier,
    labels: dict[str, int],
    max_length: int,
    source: dict[str, str],
    *,
    tokenizer: dict[str, str] | None = None,
    **extra: Any,
) -> Path:
    """`tokenizer`: the backbone's tokenizer files, kept so that every reader encodes text as training did."""
    return save_checkpoint(
        path,
        format=FORMAT,
        config=model.cfg.to_dict(),
        **lora.weights_fields(model),
        labels=labels,
        pooling=model.pooling,
        max_length=max_length,
        source=source,
        pad_id=model.pad_id,
        **({"tokenizer": tokenizer} if tokenizer else {}),
        **extra,
    )


@dataclass
class LoadedClassifier:
    model: SequenceClassifier | ClassifierEnsemble
    labels: dict[str, int]
    max_length: int
    source: dict[str, str]
    path: Path
    data_dir: str | None  # the data stage folder it was fine-tuned on
    members: list[dict[str, Any]] = field(default_factory=list)  # an ensemble's: checkpoint, sha256, accuracies
    tokenizer_files: dict[str, str] | None = None  # the backbone's own tokenizer (None: GPT-2's BPE)

    def tokenizer(self, given: Any = None, settings=None) -> Any:
        """The tokenizer its texts are read with (`model.init.text_tokenizer`; `given`: GPT-2's, if at hand)."""
        from model.init import text_tokenizer

        return text_tokenizer(self.tokenizer_files, given, settings)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]


def classifier_from_state(ckpt: dict[str, Any], path: Path, *, merged: bool = True) -> LoadedClassifier:
    """The classifier (or ensemble) of a loaded checkpoint, in eval mode; `path` names it. A LoRA classifier's
    adapters are merged into plain weights unless `merged` is False."""
    if ckpt.get("format") == ENSEMBLE_FORMAT:
        ensemble = ClassifierEnsemble([_member_model(m, len(ckpt["labels"]), path) for m in ckpt["members"]])
        members = [{k: v for k, v in m.items() if k not in ("config", "model")} for m in ckpt["members"]]
        source = {"init": f"ensemble of {len(members)}"}
        return LoadedClassifier(
            ensemble.eval(),
            dict(ckpt["labels"]),
            int(ckpt["max_length"]),
            source,
            path,
            ckpt.get("data_dir"),
            members,
            _files(ckpt.get("tokenizer")),
        )
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a gptflow classifier checkpoint (expected format {FORMAT!r} or {ENSEMBLE_FORMAT!r}); "
            "fine-tune one with `gptflow finetune-classifier`"
        )
    return LoadedClassifier(
        _member_model(ckpt, len(ckpt["labels"]), path, merged).eval(),
        dict(ckpt["labels"]),
        int(ckpt["max_length"]),
        dict(ckpt["source"]),
        path,
        ckpt.get("data_dir"),
        tokenizer_files=_files(ckpt.get("tokenizer")),
    )


def _files(files: Any) -> dict[str, str] | None:
    return dict(files) if files else None


def _member_model(ckpt: dict[str, Any], n_classes: int, path: Path, merged: bool = True) -> SequenceClassifier:
    check_finite_weights(ckpt["model"], path)
    pad_id = int(ckpt.get("pad_id", PAD_ID))  # checkpoints older than the field padded with GPT-2's 50256
    if "lora" in ckpt:  # adapters and head over the base language model it names
        model = SequenceClassifier(lora.base_language_model(ckpt, path), n_classes, ckpt["pooling"], pad_id)
        lora.restore(model, ckpt, path)
        return lora.merge(model) if merged else model
    model = SequenceClassifier(GPTModel(GPTConfig.from_dict(ckpt["config"])), n_classes, ckpt["pooling"], pad_id)
    model.load_state_dict(ckpt["model"])
    return model


def split_logits(
    loaded: LoadedClassifier, data_dir: str | Path, *, tokenizer=None, batch_size: int = 32
) -> tuple[list[str], dict[str, tuple[list[int], np.ndarray]]]:
    """Class names, and (labels, logits) of every split of `data_dir`, for a classifier (`model.opener`), its texts
    read with the classifier's own tokenizer (`tokenizer`: GPT-2's, for one that keeps none)."""
    tokenizer = loaded.tokenizer(tokenizer)
    data_dir = Path(data_dir)
    labels = read_labels(data_dir)
    if labels != loaded.labels:
        raise ClassifierError(f"{data_dir}/labels.json {labels} differs from the checkpoint's labels {loaded.labels}")
    splits = {}
    for split in ("train", "validation", "test"):
        data = encode_split(read_labelled(data_dir / f"{split}.csv", labels), tokenizer, loaded.max_length)
        splits[split] = (data.labels, predict_logits(loaded.model, data.ids, batch_size))
    return loaded.names, splits
