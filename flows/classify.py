"""Classification fine-tuning flow: data stage (spam or a user's CSV) -> fine-tune -> evaluate every split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data.config import CsvDataConfig, SpamDataConfig
from gptflow.settings import get_settings
from gptflow.storage import sha256_json
from model.classifier import ClassifierConfig
from model.init import init_digest
from tasks.classify import evaluate_splits, finetune_classifier


@flow(name="finetune-classifier")
def finetune_classifier_flow(data: str = "spam", config: ClassifierConfig = ClassifierConfig(),
                             text_column: str | None = None, label_column: str | None = None,
                             out_dir: str | None = None, resume: bool = True) -> dict:
    """`data`: "spam", a labelled CSV/TSV (with `text_column`, `label_column`) or a prepared data folder. Outputs go to
    `<home>/classify/<data>-<init>-<hash of config and init weights>` by default."""
    from flows.data import prepare_csv, prepare_spam

    if (Path(data) / "train.csv").is_file():
        data_dir = data  # a data stage folder that is already prepared
    elif data == "spam":
        data_dir = prepare_spam(SpamDataConfig())["out_dir"]
    else:
        data_dir = prepare_csv(data, CsvDataConfig(text_column=text_column, label_column=label_column))["out_dir"]
    key = sha256_json({"config": config.resume_key(), "init": init_digest(config.init)})[:8]
    name = f"{Path(data_dir).name}-{config.init_label()}-{key}"
    out = out_dir or str(get_settings().stage_dir("classify") / name)
    trained = finetune_classifier(data_dir, out, config, resume)
    metrics = evaluate_splits(trained["best"], data_dir, out)
    return {**trained, "data_dir": data_dir, "metrics": metrics}
