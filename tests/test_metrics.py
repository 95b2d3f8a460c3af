"""Classification metrics on fixed numbers (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import (
    MetricsError,
    accuracy,
    classification_report,
    confusion_matrix,
    per_class,
    report_rows,
    roc_auc,
)

Y_TRUE = [0, 0, 1, 1, 1, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]


def test_confusion_matrix_and_per_class():
    cm = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    pc = per_class(cm)
    assert pc["precision"].tolist() == [0.5, 2 / 3, 1.0]
    assert pc["recall"].tolist() == [0.5, 2 / 3, 1.0]
    assert pc["f1"].tolist() == pytest.approx([0.5, 2 / 3, 1.0], abs=1e-15)
    assert pc["support"].tolist() == [2, 3, 1]
    assert accuracy(Y_TRUE, Y_PRED) == 4 / 6


def test_a_class_never_predicted_scores_zero_not_nan():
    pc = per_class(confusion_matrix([0, 1, 1], [0, 0, 0], 2))
    assert pc["precision"].tolist() == [1 / 3, 0.0]
    assert pc["recall"].tolist() == [1.0, 0.0]
    assert pc["f1"].tolist() == [0.5, 0.0]


def test_roc_auc_exact_and_with_ties():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert roc_auc([0, 1], [0.3, 0.3]) == 0.5
    with pytest.raises(MetricsError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.4])


def test_report_is_plain_json_values():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    report = classification_report([0, 0, 1, 1], probs, ["ham", "spam"])
    assert report["accuracy"] == 0.5
    assert report["confusion_matrix"] == {"labels": ["ham", "spam"], "matrix": [[1, 1], [1, 1]]}
    assert report["roc_auc"] == 0.75
    assert report["per_class"]["spam"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report_rows(report)[-1] == {"class": "all", "accuracy": 0.5, "macro_f1": 0.5, "support": 4, "roc_auc": 0.75}
    three = classification_report([0, 1, 2], np.eye(3), ["a", "b", "c"])
    assert three["accuracy"] == 1.0 and "roc_auc" not in three


def test_mismatched_inputs_are_refused():
    with pytest.raises(MetricsError, match="equal-length"):
        accuracy([0, 1], [0])
    with pytest.raises(MetricsError, match=r"0\.\.1"):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(MetricsError, match="do not match 3 class names"):
        classification_report([0], np.ones((1, 2)), ["a", "b", "c"])
