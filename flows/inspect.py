"""Inspect flow: look inside a checkpoint on one probe text (tokens, trace, attention, logit lens, embeddings,
sampling) and publish every figure and table to the run."""

from __future__ import annotations

from prefect import flow

from model.configs import InspectConfig
from tasks.inspect import inspect_checkpoint, publish_inspection


@flow(name="inspect")
def inspect_flow(
    checkpoint: str,
    text: str,
    config: InspectConfig = InspectConfig(),
    out_dir: str | None = None,
    resume: bool = True,
    force: bool = False,
) -> dict:
    """`checkpoint`: a language-model checkpoint of any family (GPT-2, or Llama / Qwen3 converted by load-hf, read
    with its own tokenizer), a classifier's best.pt or GPT-2 weights. Outputs go to `out_dir`,
    else to the folder the stage contract names: `<home>/inspect/<model>-<key>` (report.md, PNGs, report.json);
    `force`: `out_dir` may hold files gptflow did not write."""
    result = inspect_checkpoint(checkpoint, text, config, out_dir, resume, force)
    publish_inspection(result)
    return result
