"""The Prefect task of `gptflow merge`: a LoRA checkpoint's adapters folded into plain weights (model.merge)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.merge import merge_checkpoint


@task(name="merge-lora", cache_policy=NO_CACHE)
def merge_lora(checkpoint: str, out_dir: str | None = None, force: bool = False) -> dict[str, Any]:
    """No Prefect cache: the stage contract reuses a merge already made (keyed on the checkpoint and its base)."""
    report = merge_checkpoint(checkpoint, out_dir, force=force)
    get_run_logger().info(
        "%s merged %s checkpoint %s (base %s)",
        "reused" if report["reused"] else "wrote",
        report["kind"],
        report["merged"],
        report["base"],
    )
    return report
