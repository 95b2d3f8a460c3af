"""Classification metrics in NumPy: accuracy, per-class precision/recall/F1, confusion matrix, ROC-AUC.

Conventions (as scikit-learn): confusion rows are the true class, columns the predicted class; a precision,
recall or F1 whose denominator is 0 is 0.0; ROC-AUC is the Mann-Whitney rank statistic with tied scores
given their average rank (exactly the area under the ROC curve, ties counted as half).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from gptflow.errors import GptflowError
from gptflow.storage import write_json_atomic


class MetricsError(GptflowError, ValueError):
    """Predictions and labels do not fit together."""


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = _pair(y_true, y_pred)
    return float((y_true == y_pred).mean())


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts: [true, predicted]."""
    y_true, y_pred = _pair(y_true, y_pred)
    if y_true.min() < 0 or max(y_true.max(), y_pred.max()) >= n_classes:
        raise MetricsError(f"class ids must lie in 0..{n_classes - 1}")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def roc_auc(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve for binary labels (1 = positive) and positive-class scores."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise MetricsError(f"labels {y.shape} and scores {s.shape} must be equal-length vectors")
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricsError("ROC-AUC needs both classes among the labels")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # 1-based average rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_report(y_true: Sequence[int], scores: np.ndarray, names: Sequence[str]) -> dict:
    """Everything as plain JSON values: accuracy, macro F1, per-class table, confusion matrix, ROC-AUC (2 classes).

    `scores` (N, classes): logits or probabilities. ROC-AUC ranks by scores[:, 1] - scores[:, 0]: with logits
    that is the log-odds, which never saturates the way float32 probabilities do (many ties at 1.0)."""
    probs = np.asarray(scores, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise MetricsError(f"probabilities of shape {probs.shape} do not match {len(names)} class names")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(names))
    pc = per_class(cm)
    report = {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": float(pc["f1"].mean()),
        "per_class": {
            name: {
                "precision": float(pc["precision"][i]),
                "recall": float(pc["recall"][i]),
                "f1": float(pc["f1"][i]),
                "support": int(pc["support"][i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": {"labels": list(names), "matrix": cm.tolist()},
    }
    if len(names) == 2 and 0 < (y_true == 1).sum() < len(y_true):
        report["roc_auc"] = roc_auc(y_true, probs[:, 1] - probs[:, 0])
    return report


def report_rows(report: dict) -> list[dict]:
    """Per-class rows plus an overall row, for a table artifact or the console."""
    rows = [
        {"class": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}}
        for name, m in report["per_class"].items()
    ]
    overall = {
        "class": "all",
        "accuracy": round(report["accuracy"], 4),
        "macro_f1": round(report["macro_f1"], 4),
        "support": report["n"],
    }
    if "roc_auc" in report:
        overall["roc_auc"] = round(report["roc_auc"], 4)
    return rows + [overall]


def _pair(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise MetricsError(f"labels {a.shape} and predictions {b.shape} must be equal-length non-empty vectors")
    return a, b


def write_split_reports(
    splits: dict[str, tuple[Sequence[int], np.ndarray]],
    names: Sequence[str],
    out_dir: Path,
    *,
    checkpoint: str,
    confusion_png: str,
) -> dict[str, dict]:
    """Reports of every split (labels, logits) into `out_dir/metrics.json`, and the test confusion matrix as a
    PNG; returns the reports."""
    from eval.plots import plot_confusion_matrix

    reports = {split: classification_report(labels, logits, names) for split, (labels, logits) in splits.items()}
    write_json_atomic(out_dir / "metrics.json", {"checkpoint": str(checkpoint), "reports": reports})
    plot_confusion_matrix(
        reports["test"]["confusion_matrix"]["matrix"],
        names,
        out_dir / confusion_png,
        title=f"test confusion matrix (accuracy {100 * reports['test']['accuracy']:.2f}%)",
    )
    return reports
