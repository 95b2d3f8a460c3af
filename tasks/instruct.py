"""Prefect tasks of instruction fine-tuning: train (or resume, or reuse) and answer the test split.

The stage contract (gptflow.stage) is the cache, so the tasks run every time (NO_CACHE) and return at once when
their stage is already complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from eval.plots import plot_loss_curve
from model.configs import InstructConfig
from model.instruct import finetune, generate_responses, sample_rows
from tasks.artifacts import artifact_key, publish_link, publish_table, publish_training_result, training_logger
from tasks.training import run_training


@task(cache_policy=NO_CACHE)
def finetune_model(
    data_dir: str, config: InstructConfig, out_dir: str | None = None, resume: bool = True, force: bool = False
) -> dict[str, Any]:
    """Fine-tune on the data stage's train/validation split; publish the final metrics and the loss curve."""
    logger = get_run_logger()
    done = (lambda m: m["step"] / config.max_steps) if config.max_steps else (lambda m: m["epoch"] / config.epochs)
    on_log, progress = training_logger("instruct", done)
    result = run_training(finetune, data_dir, out_dir, config, on_log=on_log, resume=resume, force=force)
    progress.finish(result.out_dir)
    logger.info("%s %s: %s", "reused" if result.reused else "trained", result.out_dir, result.metrics)
    plot = plot_loss_curve(
        result.history,
        result.out_dir / "loss_curve.png",
        f"instruction fine-tuning ({result.metrics.get('style', config.style)}, {config.init.label(config.preset)})",
    )
    publish_training_result(result, plot, "instruct", "fine-tuning")
    return {
        "out_dir": str(result.out_dir),
        "model": str(result.model_path),
        "checkpoint": str(result.checkpoint),
        "plot": str(plot),
        "reused": result.reused,
        "metrics": result.metrics,
    }


@task(cache_policy=NO_CACHE)
def answer_test_split(model_path: str, test_path: str, config: InstructConfig) -> dict[str, Any]:
    """Generate a response per test entry (resumable); publish a table of sample responses."""
    logger = get_run_logger()

    def on_response(index: int, entry: dict[str, Any]) -> None:
        logger.info("test entry %d: %r", index, entry["model_response"][:120])

    result = generate_responses(model_path, test_path, None, config, on_response=on_response)
    logger.info(
        "%s %s: %d entries (%d generated now in %.1f s)",
        "reused" if result.reused else "wrote",
        result.path,
        result.n_entries,
        result.n_generated,
        result.seconds,
    )
    name = Path(model_path).parent.name
    key = artifact_key("instruct", name, "responses")
    if config.sample_rows:
        publish_table(
            sample_rows(result.path, config.sample_rows), key, f"{name}: first {config.sample_rows} test responses"
        )
    publish_link(result.path, f"{key}-file", "test entries with model_response (input of `gptflow evaluate`)")
    return {
        "responses": str(result.path),
        "entries": result.n_entries,
        "generated": result.n_generated,
        "generation_seconds": result.seconds,
        "responses_reused": result.reused,
    }
