"""Merge flow: a LoRA checkpoint (language model or classifier) as a plain checkpoint of the merged model."""

from __future__ import annotations

from prefect import flow

from tasks.merge import merge_lora


@flow(name="merge")
def merge_flow(checkpoint: str, out_dir: str | None = None, force: bool = False) -> dict:
    """The merged checkpoint goes to `out_dir`, else to `<home>/merge/<checkpoint folder>-<key>`."""
    return merge_lora(str(checkpoint), out_dir, force)
