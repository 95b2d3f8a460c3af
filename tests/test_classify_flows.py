"""The classify and export flows end to end on a small user CSV (Prefect test harness)."""

from __future__ import annotations

import json
from pathlib import Path

from classify_data import make_texts

from model.classifier import ClassifierConfig
from model.onnx_export import ExportConfig


def test_finetune_then_export_flows(prefect_harness, settings, tmp_path):
    from flows.classify import finetune_classifier_flow
    from flows.export import export_flow

    csv = tmp_path / "topics.csv"
    make_texts(20, seed=3).rename(columns={"text": "message", "label": "topic"}).to_csv(csv, index=False)
    config = ClassifierConfig(preset="tiny", trainable="all", lr=2e-3, epochs=2, patience=None)
    out = finetune_classifier_flow(str(csv), config, text_column="message", label_column="topic")
    out_dir = Path(out["out_dir"])
    assert out_dir.parent == settings.home / "classify"
    assert set(out["metrics"]) == {"train", "validation", "test"}
    assert out["metrics"]["test"]["n"] == 12  # 60 rows, 20 per class: 14/2/4 per class
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["reports"]["test"]["confusion_matrix"]["labels"] == ["billing", "food", "sport"]
    for name in ("curves.png", "confusion_test.png", "best.pt", "last.pt", "manifest.json"):
        assert (out_dir / name).is_file()

    report = export_flow(out["best"], out["data_dir"], ExportConfig(int8=False))
    bundle = Path(report["bundle"])
    assert sorted(p.name for p in bundle.iterdir()) == [
        "encoder.json",
        "labels.json",
        "manifest.json",
        "model.onnx",
        "vocab.bpe",
    ]
    assert report["parity"]["fp32_prediction_matches"] == 12
    assert export_flow(out["best"], out["data_dir"], ExportConfig(int8=False))["reused"]
