"""The classify and export flows end to end on a small user CSV (Prefect test harness)."""

from __future__ import annotations

import json
from pathlib import Path

from classify_data import make_texts
from conftest import tiny_config

from model.configs import ExportConfig


def test_finetune_then_export_flows(prefect_harness, settings, tmp_path):
    from flows.classify import finetune_classifier_flow
    from flows.export import export_flow

    csv = tmp_path / "topics.csv"
    make_texts(20, seed=3).rename(columns={"text": "message", "label": "topic"}).to_csv(csv, index=False)
    config = tiny_config("classifier", trainable="all", lr=2e-3, epochs=2, patience=None)
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
        "card.md",
        "encoder.json",
        "labels.json",
        "manifest.json",
        "model.onnx",
        "vocab.bpe",
    ]
    assert report["parity"]["fp32_prediction_matches"] == 12
    assert export_flow(out["best"], out["data_dir"], ExportConfig(int8=False))["reused"]


def test_finetune_classifier_verb_trains_an_ensemble_from_a_recipe(prefect_harness, settings, tmp_path, capsys):
    """`gptflow finetune-classifier --config RECIPE --ensemble ...`: DAPT + fine-tuning per seed, one ensemble
    checkpoint, evaluated; `gptflow export` makes it one verified bundle."""
    from cli import main

    csv = tmp_path / "topics.csv"
    make_texts(20, seed=3).rename(columns={"text": "message", "label": "topic"}).to_csv(csv, index=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "shape: {context_length: 64, emb_dim: 32, n_layers: 2, n_heads: 2}\n"
        "dapt: {steps: 8, window: 16, batch_size: 4, warmup_steps: 1}\n"
        "ensemble: [1, 2, 3]\ntrainable: all\nlr: 2.0e-3\nepochs: 2\nkeep: last\n"
    )
    argv = ["finetune-classifier", "--config", str(recipe), "--ensemble", "4", "5"]
    assert main([*argv, "--data", str(csv), "--text-column", "message", "--label-column", "topic"]) == 0
    out = capsys.readouterr().out
    assert "built: an ensemble of 2 classifiers" in out and "the ensemble (mean class probability):" in out
    dapt = sorted(p.name for p in (settings.home / "dapt").iterdir() if p.is_dir())
    assert [name.split("-")[-2] for name in dapt] == ["seed4", "seed5"]  # --ensemble overrode the file's seeds
    model = Path(next(line for line in out.splitlines() if line.startswith("model:")).split()[1])
    assert model.parent.name.startswith("csv-topics-") and "-ensemble2-" in model.parent.name
    members = json.loads((model.parent / "manifest.json").read_text())["metrics"]["members"]
    assert [Path(m["checkpoint"]).parent.name[:-9] for m in members] == dapt  # named by their DAPT folder
    assert all(set(m["accuracy"]) == {"train", "validation", "test"} for m in members)

    assert main(["export", str(model), "--int8"]) == 0
    bundle = Path(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("bundle:")).split()[1])
    assert "An ensemble of 2 classifiers" in (bundle / "card.md").read_text()
    assert len(json.loads((bundle / "manifest.json").read_text())["members"]) == 2
