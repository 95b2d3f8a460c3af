"""Pretraining flow: make sure the corpus token files exist, then train a preset on them."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.limits import time_limit
from model.configs import PretrainConfig
from tasks.alerts import ALERT_HOOKS
from tasks.pretrain import convert_hf_model, convert_weights, train_model


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


@flow(name="load-hf")
def load_hf_flow(name_or_folder: str, keep_dtype: bool = False) -> dict:
    """A Hugging Face model (GPT-2, Llama family, Qwen3; hub name or folder) -> a gptflow checkpoint under
    `<home>/models/`, its tokenizer inside. `keep_dtype`: keep bf16 weights bf16 (default: fp32)."""
    return convert_hf_model(name_or_folder, keep_dtype)
