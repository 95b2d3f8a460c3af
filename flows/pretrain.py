"""Pretraining flow: make sure the corpus token files exist, then train a preset on them."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.limits import time_limit
from model.configs import PretrainConfig
from tasks.alerts import ALERT_HOOKS
from tasks.pretrain import convert_weights, train_model


@flow(name="pretrain", **ALERT_HOOKS)
def pretrain_flow(
    corpus: str = "tinyshakespeare",
    config: PretrainConfig = PretrainConfig(),
    out_dir: str | None = None,
    resume: bool = True,
    timeout_minutes: float | None = None,
    force: bool = False,
) -> dict:
    """`corpus`: a corpus name or text file (tokenized by the data flow first, reused if done) or a folder
    that already holds train.bin/val.bin. Outputs go to `out_dir`, else to the folder the stage contract names
    (`<home>/pretrain/<corpus>-<preset>-<key>`): the same config and data resume or reuse, a changed one trains
    afresh beside it; `force`: `out_dir` may hold files gptflow did not write. `timeout_minutes`: fail the run
    (TimedOut) past this time; it resumes from its last checkpoint when run again."""
    with time_limit(timeout_minutes, "the pretraining run"):
        if (Path(corpus) / "train.bin").is_file():
            data_dir = corpus
        else:
            from flows.prepare import prepare_corpus

            data_dir = prepare_corpus(corpus)["out_dir"]
        return train_model(data_dir, config, out_dir, resume, force)


@flow(name="load-gpt2")
def load_gpt2_flow(name_or_path: str = "gpt2-small") -> dict:
    """Public GPT-2 weights (Hugging Face safetensors) -> a gptflow checkpoint under `<home>/models/`."""
    return convert_weights(name_or_path)
