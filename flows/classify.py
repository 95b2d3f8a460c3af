"""Classification fine-tuning flow: data stage (spam or a user's CSV) -> fine-tune -> evaluate every split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from data.config import CsvDataConfig, SpamDataConfig
from model.classifier import ClassifierConfig
from tasks.classify import ensemble_classifiers, evaluate_splits, finetune_classifier, pretrain_on_domain


@flow(name="finetune-classifier")
def finetune_classifier_flow(
    data: str = "spam",
    config: ClassifierConfig = ClassifierConfig(),
    text_column: str | None = None,
    label_column: str | None = None,
    out_dir: str | None = None,
    resume: bool = True,
) -> dict:
    """`data`: "spam", a labelled CSV/TSV (with `text_column`, `label_column`) or a prepared data folder. Each
    classifier (one, or one per `config.ensemble` seed) is domain-pretrained if `config.dapt` says so, fine-tuned
    and evaluated; an ensemble's members then become one checkpoint, evaluated in turn. The final classifier goes
    to `out_dir`, else to the folder the stage contract names: `<home>/classify/<data>-<init>-<key>` (members:
    always there)."""
    from flows.prepare import prepare_csv, prepare_spam

    if (Path(data) / "train.csv").is_file():
        data_dir = data  # a data stage folder that is already prepared
    elif data == "spam":
        data_dir = prepare_spam(SpamDataConfig())["out_dir"]
    else:
        data_dir = prepare_csv(data, CsvDataConfig(text_column=text_column, label_column=label_column))["out_dir"]
    members = []
    for member in config.members():
        if member.dapt is not None:
            member = pretrain_on_domain(data_dir, member, resume)["config"]
        trained = finetune_classifier(data_dir, member, None if config.ensemble else out_dir, resume)
        members.append({**trained, "metrics": evaluate_splits(trained["best"], data_dir, trained["out_dir"])})
    if not config.ensemble:
        return {**members[0], "data_dir": data_dir}
    ensemble = ensemble_classifiers(data_dir, members, out_dir)
    metrics = evaluate_splits(ensemble["best"], data_dir, ensemble["out_dir"])
    return {**ensemble, "data_dir": data_dir, "metrics": metrics, "members": members}
