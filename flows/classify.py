"""Classification fine-tuning flow: data stage (spam or a user's CSV) -> fine-tune -> evaluate every split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data.config import CsvDataConfig, SpamDataConfig
from model.classifier import ClassifierConfig
from tasks.classify import evaluate_splits, finetune_classifier


@flow(name="finetune-classifier")
def finetune_classifier_flow(
    data: str = "spam",
    config: ClassifierConfig = ClassifierConfig(),
    text_column: str | None = None,
    label_column: str | None = None,
    out_dir: str | None = None,
    resume: bool = True,
) -> dict:
    """`data`: "spam", a labelled CSV/TSV (with `text_column`, `label_column`) or a prepared data folder. Outputs go to
    `out_dir`, else to the folder the stage contract names: `<home>/classify/<data>-<init>-<key>`."""
    from flows.prepare import prepare_csv, prepare_spam

    if (Path(data) / "train.csv").is_file():
        data_dir = data  # a data stage folder that is already prepared
    elif data == "spam":
        data_dir = prepare_spam(SpamDataConfig())["out_dir"]
    else:
        data_dir = prepare_csv(data, CsvDataConfig(text_column=text_column, label_column=label_column))["out_dir"]
    trained = finetune_classifier(data_dir, config, out_dir, resume)
    metrics = evaluate_splits(trained["best"], data_dir, trained["out_dir"])
    return {**trained, "data_dir": data_dir, "metrics": metrics}
