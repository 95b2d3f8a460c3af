"""Classification fine-tuning flow: data stage (spam or a user's CSV) -> fine-tune -> evaluate every split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data.config import CsvDataConfig, SpamDataConfig
from model.configs import ClassifierConfig
from tasks.classify import ensemble_classifiers, evaluate_splits, train_classifier
from tasks.parallel import ParallelTaskRunner


@flow(name="finetune-classifier", task_runner=ParallelTaskRunner())
def finetune_classifier_flow(
    data: str = "spam",
    config: ClassifierConfig = ClassifierConfig(),
    text_column: str | None = None,
    label_column: str | None = None,
    out_dir: str | None = None,
    resume: bool = True,
    force: bool = False,
) -> dict:
    """`data`: "spam", a labelled CSV/TSV (with `text_column`, `label_column`) or a prepared data folder. Each
    classifier (one, or one per `config.ensemble` seed) is domain-pretrained if `config.dapt` says so, fine-tuned
    and evaluated; an ensemble's members train in parallel (tasks/parallel.py), then become one checkpoint,
    evaluated in turn. The final classifier goes to `out_dir`, else to the folder the stage contract names:
    `<home>/classify/<data>-<init>-<key>` (members: always there); `force`: `out_dir` may hold files gptflow did
    not write."""
    data_dir = prepared_data(data, text_column, label_column)
    if not config.ensemble:
        return {**train_classifier(data_dir, config, out_dir, resume, force), "data_dir": data_dir}
    futures = [train_classifier.submit(data_dir, member, None, resume) for member in config.members()]
    members = [future.result() for future in futures]  # a failed member raises its own error here
    ensemble = ensemble_classifiers(data_dir, futures, out_dir, force)  # the futures: the UI links the members to it
    metrics = evaluate_splits(ensemble["best"], data_dir, ensemble["out_dir"])
    return {**ensemble, "data_dir": data_dir, "metrics": metrics, "members": members}


def prepared_data(data: str, text_column: str | None, label_column: str | None) -> str:
    """The data stage folder of `data` ("spam", a labelled CSV/TSV or a prepared folder), prepared if need be."""
    from flows.prepare import prepare_csv, prepare_spam

    if (Path(data) / "train.csv").is_file():
        return data  # a data stage folder that is already prepared
    if data == "spam":
        return prepare_spam(SpamDataConfig())["out_dir"]
    return prepare_csv(data, CsvDataConfig(text_column=text_column, label_column=label_column))["out_dir"]
