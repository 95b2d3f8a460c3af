"""Prefect tasks of classification fine-tuning: train (or resume, or reuse) and evaluate every split.

The stage folder's manifest is the cache (data file hashes + config), so the tasks run every time
(NO_CACHE) and return at once when the stage is already complete.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from eval.metrics import report_rows, write_split_reports
from eval.plots import plot_loss_curve, plot_training_curves
from model.classifier import split_logits
from model.configs import ClassifierConfig
from model.files import CLASSIFIERS
from model.finetune_classifier import build_ensemble, finetune, pretrain_domain
from model.opener import open_model
from tasks.artifacts import artifact_key, publish_plot, publish_table, publish_training_result, training_logger
from tasks.training import run_training

CURVES = "curves.png"
CONFUSION = "confusion_test.png"


@task(cache_policy=NO_CACHE)
def train_classifier(
    data_dir: str, config: ClassifierConfig, out_dir: str | None = None, resume: bool = True, force: bool = False
) -> dict[str, Any]:
    """One classifier: domain-adaptive pretraining if `config.dapt` says so, fine-tuning, then the metrics of every
    split, each stage its own task run inside this one. The unit a flow submits to its parallel runner
    (tasks/parallel.py): it logs the host and process it runs in."""
    get_run_logger().info("training in process %d on %s", os.getpid(), socket.gethostname())
    if config.dapt is not None:
        config = pretrain_on_domain(data_dir, config, resume)["config"]
    trained = finetune_classifier(data_dir, config, out_dir, resume, force)
    return {**trained, "metrics": evaluate_splits(trained["best"], data_dir, trained["out_dir"])}


@task(cache_policy=NO_CACHE)
def pretrain_on_domain(data_dir: str, config: ClassifierConfig, resume: bool = True) -> dict[str, Any]:
    """Domain-adaptive pretraining of the model `config` starts from (its `dapt`); returns the stage's outputs and
    the config that fine-tunes from its model."""
    logger = get_run_logger()
    on_log, progress = training_logger("dapt", lambda m: m["step"] / config.dapt.steps)
    result = run_training(pretrain_domain, data_dir, None, config, on_log=on_log, resume=resume)
    progress.finish(result.out_dir)
    logger.info("%s %s: %s", "reused" if result.reused else "trained", result.out_dir, result.metrics)
    plot = plot_loss_curve(result.history, result.out_dir / "loss_curve.png", "domain-adaptive pretraining")
    publish_training_result(result, plot, "dapt", "domain-adaptive pretraining")
    return {
        "out_dir": str(result.out_dir),
        "model": str(result.model_path),
        "reused": result.reused,
        "metrics": result.metrics,
        "config": config.after_dapt(result.model_path),
    }


@task(cache_policy=NO_CACHE)
def finetune_classifier(
    data_dir: str, config: ClassifierConfig, out_dir: str | None = None, resume: bool = True, force: bool = False
) -> dict[str, Any]:
    logger = get_run_logger()
    on_log, progress = training_logger("classify", lambda m: m["epoch"] / config.epochs)
    result = run_training(finetune, data_dir, out_dir, config, on_log=on_log, resume=resume, force=force)
    progress.finish(result.out_dir)
    logger.info("%s %s: %s", "reused" if result.reused else "trained", result.out_dir, result.summary)
    key = artifact_key("classify", result.out_dir.name)
    evals = [h for h in result.history if h["kind"] == "eval"]
    curves = plot_training_curves(evals, result.out_dir / CURVES, title=f"fine-tuning ({config.init})")
    publish_table(evals, f"{key}-history", f"{result.out_dir.name}: validation after each evaluation")
    publish_plot(curves, f"{key}-curves", f"{result.out_dir.name}: loss and accuracy")
    return _classifier_result(result)


@task(cache_policy=NO_CACHE)
def ensemble_classifiers(
    data_dir: str, members: list[dict[str, Any]], out_dir: str | None = None, force: bool = False
) -> dict[str, Any]:
    """One checkpoint of the members (fine-tuning results with their split metrics) that averages their class
    probabilities; publishes the members' accuracies."""
    result = build_ensemble(data_dir, members, out_dir, force=force)
    get_run_logger().info("%s ensemble %s", "reused" if result.reused else "built", result.best)
    rows = [
        {
            "member": Path(m["checkpoint"]).parent.name,
            **{f"{s}_accuracy": round(a, 4) for s, a in m["accuracy"].items()},
        }
        for m in result.summary["members"]
    ]
    name = result.out_dir.name
    publish_table(rows, f"{artifact_key('classify', name)}-members", f"{name}: the ensemble's members")
    return _classifier_result(result)


@task(cache_policy=NO_CACHE)
def evaluate_splits(model_path: str, data_dir: str, out_dir: str) -> dict[str, Any]:
    loaded = open_model(model_path, CLASSIFIERS).classifier()
    names, splits = split_logits(loaded, data_dir)  # read with the classifier's own tokenizer
    reports = write_split_reports(splits, names, Path(out_dir), checkpoint=model_path, confusion_png=CONFUSION)
    logger = get_run_logger()
    for split, report in reports.items():
        logger.info("%s accuracy %.4f (n=%d)", split, report["accuracy"], report["n"])
    name = Path(out_dir).name
    key = artifact_key("classify", name)
    publish_table(
        [
            {
                "split": s,
                "accuracy": round(r["accuracy"], 4),
                "macro_f1": round(r["macro_f1"], 4),
                "roc_auc": round(r["roc_auc"], 4) if "roc_auc" in r else None,
                "n": r["n"],
            }
            for s, r in reports.items()
        ],
        f"{key}-accuracy",
        f"{name}: accuracy per split",
    )
    publish_table(report_rows(reports["test"]), f"{key}-test-metrics", f"{name}: test metrics per class")
    publish_plot(Path(out_dir) / CONFUSION, f"{key}-confusion", f"{name}: test confusion matrix")
    return {
        split: {k: r[k] for k in ("accuracy", "macro_f1", "n", "roc_auc") if k in r} for split, r in reports.items()
    }


def _classifier_result(result) -> dict[str, Any]:
    """What a classifier stage (one classifier or an ensemble) returns to its flow: paths and its summary."""
    return {
        "out_dir": str(result.out_dir),
        "best": str(result.best),
        "summary": result.summary,
        "reused": result.reused,
    }
