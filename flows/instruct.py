"""Instruction fine-tuning flow: instruction data -> fine-tune -> responses for the test split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from gptflow.splits import INSTRUCTION_FILES
from model.configs import InstructConfig
from tasks.instruct import answer_test_split, finetune_model


@flow(name="finetune-instructions")
def finetune_instructions(
    data: str | None = None,
    config: InstructConfig = InstructConfig(),
    out_dir: str | None = None,
    resume: bool = True,
    force: bool = False,
) -> dict:
    """`data`: None (the book's instruction-data.json through the data flow), a JSON file of entries (split by
    the data flow) or a folder that already holds train/validation/test.json. Outputs go to `out_dir`, else to the
    folder the stage contract names (`<home>/instruct/<data>-<init>-<style>-<key>`); responses to its `responses/`.
    `force`: `out_dir` may hold files gptflow did not write."""
    if data is not None and all((Path(data) / name).is_file() for name in INSTRUCTION_FILES):
        data_dir = data
    else:
        from flows.prepare import prepare_instructions

        data_dir = prepare_instructions(data)["out_dir"]
    trained = finetune_model(data_dir, config, out_dir, resume, force)
    responses = answer_test_split(trained["model"], str(Path(data_dir) / "test.json"), config)
    return {**trained, **responses, "data_dir": data_dir}
