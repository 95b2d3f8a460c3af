"""Running a training stage from a task: in the task's own process, or under torchrun when the stage config's
`launcher` says so (model.launch), with rank 0's training records streamed into the same logger and progress
artifact either way."""

from __future__ import annotations

from typing import Any, Callable

from prefect import get_run_logger

from gptflow.settings import get_settings
from gptflow.storage import sha256_json
from model.launch import launch


def run_training(
    stage_fn: Callable[..., Any],
    data_dir: str,
    out_dir: str | None,
    config: Any,
    *,
    on_log: Callable[[dict[str, Any]], None],
    resume: bool,
    force: bool = False,
    **local: Any,
) -> Any:
    """`stage_fn(data_dir, out_dir, config, on_log=..., resume=..., force=..., **local)`. Under torchrun the ranks
    train and write the stage folder, then the call here finds the stage complete and returns its result (reused).
    `local` (the tokenizer) stays in this process. A failed rank fails the task with the ranks' logs."""
    launcher = config.launcher
    if launcher.kind != "torchrun":
        return stage_fn(data_dir, out_dir, config, on_log=on_log, resume=resume, force=force, **local)
    # The launch folder (and torchrun's run id, which every node must agree on) is named by the call itself.
    call = {"data_dir": str(data_dir), "out_dir": str(out_dir), "config": config.model_dump(mode="json")}
    name = f"{stage_fn.__name__}-{sha256_json(call)[:12]}"
    get_run_logger().info(
        "%s: training under torchrun, %d node(s) x %d process(es)", name, launcher.nnodes, launcher.nproc_per_node
    )
    records: list[dict[str, Any]] = []

    def on_record(record: dict[str, Any]) -> None:
        records.append(record)
        on_log(record)

    launch(
        f"{stage_fn.__module__}:{stage_fn.__qualname__}",
        (data_dir, out_dir),
        {"resume": resume, "force": force},
        config=config,
        workdir=get_settings().home / "launch" / name,
        on_record=on_record,
    )
    result = stage_fn(data_dir, out_dir, config, resume=resume, force=force, **local)
    result.reused = not records  # the ranks trained (or resumed) only if they sent records
    return result
