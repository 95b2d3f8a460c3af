"""Pretraining flow: make sure the corpus token files exist, then train a preset on them."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from gptflow.settings import get_settings
from gptflow.storage import sha256_file, sha256_json
from model.pretrain import PretrainConfig
from tasks.pretrain import convert_weights, train_model


@flow(name="pretrain")
def pretrain_flow(corpus: str = "tinyshakespeare", config: PretrainConfig = PretrainConfig(),
                  out_dir: str | None = None, resume: bool = True) -> dict:
    """`corpus`: a corpus name or text file (tokenized by the data flow first, reused if done) or a folder
    that already holds train.bin/val.bin. Outputs go to `<home>/pretrain/<corpus>-<preset>-<hash of config and
    token files>` by default: the same config and data resume or reuse, a changed one trains afresh beside it."""
    if (Path(corpus) / "train.bin").is_file():
        data_dir, name = corpus, Path(corpus).name
    else:
        from flows.data import prepare_corpus

        data = prepare_corpus(corpus)
        data_dir, name = data["out_dir"], data["report"]["name"]
    tokens = {f: sha256_file(Path(data_dir) / f) for f in ("train.bin", "val.bin")}
    key = sha256_json({"config": config.resume_key(), "tokens": tokens})[:8]
    out = out_dir or str(get_settings().stage_dir("pretrain") / f"{name}-{config.preset}-{key}")
    return train_model(data_dir, out, config, resume)


@flow(name="load-gpt2")
def load_gpt2_flow(name_or_path: str = "gpt2-small") -> dict:
    """Public GPT-2 weights (Hugging Face safetensors) -> a gptflow checkpoint under `<home>/models/`."""
    return convert_weights(name_or_path)
