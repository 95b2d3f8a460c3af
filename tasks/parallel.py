"""The task runner of independent trainings (ensemble members, sweep variants): prefect-dask's, on the Dask scheduler
that GPTFLOW_DASK_ADDRESS names, else on a local cluster of GPTFLOW_DASK_WORKERS worker processes.

A flow declares `ParallelTaskRunner()` at import. Prefect duplicates a flow's runner for each run (and for each task
a worker runs), which is when the settings are read; the runner starts its cluster only when the first task is
submitted, so a run that calls its tasks directly (one classifier) starts none.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from distributed import LocalCluster
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from gptflow.settings import Settings, get_settings

# The thread pools a worker's torch (OpenMP, MKL) and numpy (OpenBLAS) size themselves by; torch reads the first
# two when it is imported. Dask sets them to 1 before it spawns a worker unless the worker's env says otherwise.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class ParallelTaskRunner(DaskTaskRunner):
    """DaskTaskRunner configured from the settings (`dask_options`) each time Prefect duplicates it."""

    def duplicate(self) -> "ParallelTaskRunner":
        return type(self)(**dask_options(get_settings()))

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        with _api_for_workers():
            return super().submit(task, parameters, wait_for, dependencies)


def dask_options(settings: Settings) -> dict[str, Any]:
    """DaskTaskRunner's arguments: the scheduler address, or a local cluster of single-threaded worker processes
    whose torch each uses its share of this machine's CPUs (a config's `threads` still overrides it in training)."""
    if settings.dask_address:
        return {"address": settings.dask_address}
    threads = str(max(1, _cpu_count() // settings.dask_workers))
    return {
        "cluster_class": local_cluster,
        "cluster_kwargs": {
            "n_workers": settings.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "env": dict.fromkeys(THREAD_VARIABLES, threads),
        },
    }


def local_cluster(**kwargs: Any) -> LocalCluster:
    """`distributed.LocalCluster(**kwargs)` that leaves this process's environment as it was. Before it spawns a
    worker, a Dask nanny writes its `pre-spawn-environ` (OMP_NUM_THREADS=1, ...) into the environment of the process
    that runs it, here the flow's, whose later subprocesses (a torchrun launch) would inherit it."""
    before = dict(os.environ)
    try:
        return LocalCluster(**kwargs)
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


@contextlib.contextmanager
def _api_for_workers() -> Iterator[None]:
    """With PREFECT_API_URL unset, Prefect runs the flow against a temporary API server that this process started;
    a task's settings travel to its worker with it, and without a URL the worker would start a server of its own
    (and time out, or write to the same database from a second server). The task is sent that server's URL."""
    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's client started for this process's flow run
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _cpu_count() -> int:
    """The CPUs this process may run on (a container's or taskset's share), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
