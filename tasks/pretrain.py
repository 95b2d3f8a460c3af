"""Prefect tasks of the model core: pretraining, and GPT-2 and Hugging Face weight conversion.

The stage contract (gptflow.stage) is the cache, so the tasks run every time (NO_CACHE) and return at once when
their stage is already complete.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from eval.plots import plot_loss_curve
from gptflow.tokenizer import get_tokenizer
from model.configs import PretrainConfig
from model.hf_models import convert_hf
from model.pretrain import pretrain
from model.weights import convert_gpt2
from tasks.artifacts import publish_training_result, training_logger
from tasks.training import run_training


@task(cache_policy=NO_CACHE)
def train_model(
    data_dir: str, config: PretrainConfig, out_dir: str | None = None, resume: bool = True, force: bool = False
) -> dict[str, Any]:
    """Pretrain (or resume, or reuse) and publish the final metrics and the loss curve."""
    logger = get_run_logger()
    on_log, progress = training_logger("pretrain", lambda m: m["step"] / config.steps)
    result = run_training(
        pretrain, data_dir, out_dir, config, on_log=on_log, resume=resume, force=force, tokenizer=get_tokenizer()
    )
    progress.finish(result.out_dir)
    logger.info("%s %s: %s", "reused" if result.reused else "trained", result.out_dir, result.metrics)
    plot = plot_loss_curve(result.history, result.out_dir / "loss_curve.png", f"{config.preset} pretraining")
    publish_training_result(result, plot, "pretrain", "pretraining")
    return {
        "out_dir": str(result.out_dir),
        "model": str(result.model_path),
        "checkpoint": str(result.checkpoint),
        "reused": result.reused,
        "metrics": result.metrics,
    }


@task(cache_policy=NO_CACHE)
def convert_weights(name_or_path: str) -> dict[str, Any]:
    """GPT-2 safetensors (preset name via the mirror-aware download layer, or a local path) -> our checkpoint."""
    path, reused = convert_gpt2(name_or_path)
    get_run_logger().info("%s %s -> %s", "reused" if reused else "converted", name_or_path, path)
    return {"model": str(path), "reused": reused}


@task(cache_policy=NO_CACHE)
def convert_hf_model(name_or_folder: str, keep_dtype: bool = False) -> dict[str, Any]:
    """A Hugging Face model (hub name via the mirror-aware download layer, or a local folder) -> our checkpoint."""
    path, reused = convert_hf(name_or_folder, keep_dtype=keep_dtype)
    get_run_logger().info("%s %s -> %s", "reused" if reused else "converted", name_or_folder, path)
    return {"model": str(path), "reused": reused}
