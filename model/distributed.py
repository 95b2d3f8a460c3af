"""Data-parallel training with PyTorch's own stack: torchrun starts the processes, `torch.distributed` connects
them (gloo on CPUs, NCCL between GPUs) and `DistributedDataParallel` averages the gradients. The training loop
(model.training) does the rest: rank r reads micro-batches r, r + W, r + 2W, ... of the global order, and rank 0
alone writes checkpoints, manifests and logs.

Two ways in, one training code path:
- `torchrun ... gptflow VERB`: rank 0 runs the verb (its Prefect flow, data stages, reports); the other ranks
  `follow()`: every stage function marked `@replicated` that rank 0 calls is sent to them and run there too, so
  they join its training. Nothing else runs on them.
- A stage whose config says `launcher: {kind: torchrun}`: its Prefect task starts torchrun on `model.launch`,
  which calls the stage function on every rank (see `Launcher`).

A non-zero rank's part of a stage ends with its training (`FollowerDone`): what comes after, writing the model
and the manifest, is rank 0's.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import importlib
import signal
import sys
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from gptflow.errors import GptflowError
from gptflow.ranks import process_ranks

# Control messages (the calls rank 0 makes, evaluation results) travel on a gloo group of their own. The other
# ranks wait there while rank 0 prepares data, evaluates or generates, which can take far longer than a
# collective of the training step is allowed to.
CONTROL_TIMEOUT = datetime.timedelta(hours=24)
# Arguments of a stage function that stay on rank 0: callbacks and the tokenizer (the others rebuild it).
LOCAL_ARGUMENTS = frozenset({"on_log", "on_response", "tokenizer", "progress"})

_control: dist.ProcessGroup | None = None
_leading = False

F = TypeVar("F", bound=Callable[..., Any])


class LaunchError(GptflowError, RuntimeError):
    """A torchrun launch failed, or a config asks for another number of processes than the job has."""


class FollowerDone(Exception):
    """Raised on a rank > 0 at the end of training: the rest of the stage (writing its products) is rank 0's."""


def init() -> None:
    """Join the job's process group (once per process): NCCL for CUDA tensors on a machine with GPUs, gloo for
    CPU tensors, plus the gloo control group."""
    global _control
    if dist.is_initialized():
        return
    die_with_parent()
    ranks = process_ranks()
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def death_signal(sig: int) -> Callable[[], None]:
    """A function that makes the process calling it receive `sig` when its parent dies (Linux; elsewhere it does
    nothing). libc is looked up now, so the function is safe as a `preexec_fn` between fork and exec."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, sig)  # 1: PR_SET_PDEATHSIG


def die_with_parent() -> None:
    """torchrun starts each rank in a session of its own: without this, a torchrun killed with SIGKILL would leave
    its ranks training (and writing the stage folder) with nobody waiting for them."""
    death_signal(signal.SIGKILL)()


def broadcast(value: Any = None) -> Any:
    """Rank 0's `value` on every rank (any picklable object), over the control group."""
    init()
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def gather(value: Any) -> list[Any] | None:
    """Every rank's `value` as a list on rank 0 (None on the others), over the control group."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0, group=_control)
    return out


def barrier() -> None:
    dist.barrier(group=_control)


def replicated(fn: F) -> F:
    """Mark a stage function that trains: called on rank 0 of `torchrun gptflow VERB`, it is called on every
    rank (with the same arguments, less `LOCAL_ARGUMENTS`)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _leading:
            shared = {k: v for k, v in kwargs.items() if k not in LOCAL_ARGUMENTS}
            broadcast((f"{fn.__module__}:{fn.__qualname__}", args, shared))
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


@contextlib.contextmanager
def lead() -> Iterator[None]:
    """Rank 0 of `torchrun gptflow VERB` runs the verb inside this block; at its end the followers are released.
    On an error they are not: rank 0's exit makes torchrun stop them (they may be inside a collective)."""
    global _leading
    init()
    _leading = True
    try:
        yield
    finally:
        _leading = False
    broadcast(None)


def follow() -> None:
    """Ranks > 0 of `torchrun gptflow VERB`: run each stage call rank 0 sends, until it sends None."""
    init()
    while (message := broadcast()) is not None:
        target, args, kwargs = message
        run_call(target, args, kwargs)


def run_call(target: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> Any:
    """Call `module:function` (a `@replicated` stage function); on a rank > 0 its end is `FollowerDone`."""
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        return fn(*args, **(kwargs or {}))
    except FollowerDone:
        return None


def destroy() -> None:
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None
