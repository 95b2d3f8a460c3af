"""Running a training stage under torchrun from a process that is not part of the job (a Prefect task).

The task calls `launch()`, which writes the call (a `@replicated` stage function, its arguments and config) to a
JSON file and starts `torchrun ... -m model.launch CALL.json`. Every rank calls the stage function (`main`); rank 0
appends each training record to `records.jsonl`, which `launch()` follows while the job runs and hands to
`on_record`. Each rank's stdout and stderr go to files under the launch folder; when a rank fails, the error
names the failed ranks and carries the end of their stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from gptflow.ranks import process_ranks
from gptflow.storage import write_json_atomic
from gptflow.tokenizer import get_tokenizer
from model.configs import Launcher
from model.distributed import LaunchError, death_signal, destroy, run_call

RECORDS = "records.jsonl"
TORCHRUN_LOG = "torchrun.log"
CALL = "call.json"
RANK_LOG_TAIL = 30  # lines of each failed rank's stderr in the error


def torchrun_command(launcher: Launcher, call_file: Path, log_dir: Path, run_id: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={launcher.nproc_per_node}",
        f"--nnodes={launcher.nnodes}",
    ]
    if launcher.rdzv_endpoint:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launcher.rdzv_endpoint}", f"--rdzv-id={run_id}"]
    else:
        command.append("--standalone")
    return command + ["--log-dir", str(log_dir), "--redirects", "3", "-m", "model.launch", str(call_file)]


def launch(
    target: str,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    *,
    config: Any,
    workdir: Path,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 0.5,
) -> None:
    """Run `target(*args, config=config, **kwargs)` (a `@replicated` stage function) on `config.launcher`'s ranks.
    `workdir` receives the call, the records and the rank logs (removed when every rank succeeds)."""
    launcher: Launcher = config.launcher
    if launcher.kind != "torchrun":
        raise ValueError(f"launch() needs a torchrun launcher, got {launcher.kind!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    records = workdir / RECORDS
    records.unlink(missing_ok=True)
    call = {
        "target": target,
        "args": [str(a) if isinstance(a, Path) else a for a in args],
        "kwargs": {k: str(v) if isinstance(v, Path) else v for k, v in (kwargs or {}).items()},
        "config_class": f"{type(config).__module__}:{type(config).__qualname__}",
        "config": config.model_dump(mode="json"),
        "records": str(records),
    }
    write_json_atomic(workdir / CALL, call)
    logs = workdir / "ranks"
    command = torchrun_command(launcher, workdir / CALL, logs, workdir.name)
    with open(workdir / TORCHRUN_LOG, "wb") as torchrun_log:
        # torchrun is told to stop (and stops its ranks) when this process dies, even by SIGKILL
        process = subprocess.Popen(
            command, stdout=torchrun_log, stderr=subprocess.STDOUT, preexec_fn=death_signal(signal.SIGTERM)
        )
    seen = 0
    try:
        while True:
            finished = process.poll() is not None
            seen = _follow(records, seen, on_record)
            if finished:
                break
            time.sleep(poll_s)
    except BaseException:  # interrupted (Ctrl-C, a cancelled task): take the ranks down with us
        process.terminate()
        process.wait(timeout=60)
        raise
    if process.returncode != 0:
        raise LaunchError(_failure(target, process.returncode, logs, workdir / TORCHRUN_LOG))
    shutil.rmtree(workdir, ignore_errors=True)


def _follow(records: Path, seen: int, on_record: Callable[[dict[str, Any]], None] | None) -> int:
    """Hand the complete lines of `records` after byte `seen` to `on_record`; returns the new offset."""
    if not records.is_file():
        return seen
    with open(records, "rb") as f:
        f.seek(seen)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        if on_record is not None and line.strip():
            on_record(json.loads(line))
    return seen + len(complete)


def _failure(target: str, code: int, logs: Path, torchrun_log: Path) -> str:
    parts = [f"{target} under torchrun failed (exit code {code}); rank logs: {logs}"]
    for stderr in sorted(logs.rglob("stderr.log")):
        lines = stderr.read_text(encoding="utf-8", errors="replace").splitlines()
        if any("Error" in line or "Traceback" in line for line in lines):
            parts.append(f"--- {stderr.relative_to(logs)} (last {RANK_LOG_TAIL} lines):")
            parts += lines[-RANK_LOG_TAIL:]
    if len(parts) == 1:
        parts += torchrun_log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-RANK_LOG_TAIL:]
    return "\n".join(parts)


def main(call_file: str) -> None:
    """One rank of a launch: call the stage function; rank 0 writes the training records."""
    call = json.loads(Path(call_file).read_text(encoding="utf-8"))
    module, _, name = call["config_class"].partition(":")
    config = getattr(importlib.import_module(module), name).model_validate(call["config"])
    kwargs = {**call["kwargs"], "config": config}
    with contextlib.ExitStack() as stack:
        if process_ranks().is_main:
            if getattr(config, "sample_tokens", 0):  # rank 0 evaluates: pretraining's text samples need it
                kwargs["tokenizer"] = get_tokenizer()
            records = stack.enter_context(open(call["records"], "a", encoding="utf-8"))

            def write_record(record: dict[str, Any]) -> None:
                records.write(json.dumps(record, default=str) + "\n")
                records.flush()  # launch() follows the file while the ranks train

            kwargs["on_log"] = write_record
        stack.callback(destroy)
        run_call(call["target"], tuple(call["args"]), kwargs)


if __name__ == "__main__":
    main(sys.argv[1])
