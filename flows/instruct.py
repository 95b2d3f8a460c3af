"""Instruction fine-tuning flow: instruction data -> fine-tune -> responses for the test split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from gptflow.settings import get_settings
from gptflow.storage import sha256_json
from model.init import init_digest
from model.instruct import RESPONSES_DIR, InstructConfig
from tasks.instruct import answer_test_split, finetune_model

SPLITS = ("train.json", "validation.json", "test.json")


@flow(name="finetune-instructions")
def finetune_instructions(data: str | None = None, config: InstructConfig = InstructConfig(),
                          out_dir: str | None = None, resume: bool = True) -> dict:
    """`data`: None (the book's instruction-data.json through the data flow), a JSON file of entries (split by
    the data flow) or a folder that already holds train/validation/test.json. Outputs go to
    `<home>/instruct/<data>-<init>-<style>-<hash of config and init weights>` by default; responses to its `responses/`."""
    if data is not None and all((Path(data) / name).is_file() for name in SPLITS):
        data_dir = data
    else:
        from flows.data import prepare_instructions

        data_dir = prepare_instructions(data)["out_dir"]
    key = sha256_json({"config": config.resume_key(), "init": init_digest(config.init)})[:8]
    name = f"{Path(data_dir).name}-{config.init_label()}-{config.style}-{key}"
    out = Path(out_dir or get_settings().stage_dir("instruct") / name)
    trained = finetune_model(data_dir, str(out), config, resume)
    responses = answer_test_split(trained["model"], str(Path(data_dir) / "test.json"), str(out / RESPONSES_DIR),
                                  config)
    return {**trained, **responses, "data_dir": data_dir}
