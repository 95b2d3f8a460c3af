"""Training and classifier plots: loss curves, loss/accuracy curves, the confusion matrix (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gptflow.storage import atomic_path


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out `fig` and write it as a PNG (dpi 100) atomically; the Agg canvas is attached here, so no pyplot."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plot_loss_curve(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Training loss (each log) and validation loss (each evaluation) against optimizer steps."""
    trains = [h for h in history if h["kind"] == "train"]
    evals = [h for h in history if h["kind"] == "eval"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([h["step"] for h in trains], [h["loss"] for h in trains], label="train loss")
    ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, Path(path))


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Train/validation loss and accuracy against epochs (one point per evaluation record)."""
    history = [h for h in history if h.get("kind", "eval") == "eval"]
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    for ax, key, label in ((loss_ax, "loss", "cross-entropy"), (acc_ax, "accuracy", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label=f"train {key}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    best = [h for h in history if h.get("best")]
    if best:
        acc_ax.axvline(best[-1]["epoch"], color="grey", linestyle="--", linewidth=1)
    fig.suptitle(title)
    return save_figure(fig, Path(path))


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str) -> Path:
    cm = np.asarray(matrix)
    size = max(4.0, 0.6 * len(labels) + 2.5)
    fig = Figure(figsize=(size + 1.0, size))  # room for the title
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, Path(path))
