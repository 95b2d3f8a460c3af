"""A hyper-parameter sweep of classifiers: every variant of a grid trained and evaluated in parallel, one table."""

from __future__ import annotations

from typing import Any

from prefect import allow_failure, flow

from flows.classify import prepared_data
from model.configs import ClassifierConfig
from model.sweep import grid_variants
from tasks.classify import train_classifier
from tasks.parallel import ParallelTaskRunner
from tasks.sweep import report_sweep


@flow(name="sweep-classifier", task_runner=ParallelTaskRunner())
def sweep_classifier_flow(
    data: str,
    config: ClassifierConfig,
    grid: dict[str, list[Any]],
    text_column: str | None = None,
    label_column: str | None = None,
    resume: bool = True,
) -> list[dict[str, Any]]:
    """`grid` maps ClassifierConfig fields to the values to try ({"seed": [1, 2], "lr": [1e-4, 3e-4]}: 4 variants);
    `config` gives every other field, `data` is what finetune-classifier takes. Each variant is a classifier of its
    own stage folder, trained (with its domain pretraining if `config.dapt`) and evaluated as a task on the parallel
    runner (tasks/parallel.py). Returns the variants best validation accuracy first; a variant that failed comes last
    with its "error", and the others are kept."""
    variants = grid_variants(config, grid)  # every variant is checked before anything trains
    data_dir = prepared_data(data, text_column, label_column)
    futures = [train_classifier.submit(data_dir, variant, None, resume) for _, variant in variants]
    return report_sweep(data_dir, [fields for fields, _ in variants], [allow_failure(f) for f in futures])
