"""What the command sets up around Prefect, without importing it (verbs that run no flow, and bad input caught
before any flow starts, do not pay Prefect's start-up):

- tracebacks go to a log file, not the terminal: Prefect logs a failed task run and its flow run each with the
  whole traceback (some 90 lines for one bad CSV) before the command prints its one-line error;
- the temporary API server Prefect starts dies with the command, even when the command is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.abc
import importlib.util
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Iterator

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # where Prefect's engines log a run's failure
SERVER_MODULE = "prefect.server.api.server"


class TracebackFile(logging.Filter):
    """A filter for Prefect's console handler: a record with a traceback is appended to `path` (created on first
    use) instead of being shown. Prefect's API handler is not filtered, so the run's logs in the UI keep it."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.used = False
        self._format = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s").format

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(self._format(record) + "\n")
        except OSError:
            return True  # on the terminal rather than nowhere
        self.used = True
        return False


@contextlib.contextmanager
def tracebacks_to_file(path: Path) -> Iterator[TracebackFile]:
    """Route tracebacks logged while the block runs to `path`; `.used` says whether any was. Prefect creates its
    console handler when it is imported, so the filter goes onto it when the first run logs (a filter on the run
    loggers sees each of their records before any handler does); it is taken off again at the end."""
    tracebacks = TracebackFile(path)
    consoles: list[logging.Handler] = []

    def attach(record: logging.LogRecord) -> bool:
        if not consoles:
            from prefect.logging.handlers import PrefectConsoleHandler  # imported by now: a run is logging

            consoles.extend(h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler))
            for handler in consoles:
                handler.addFilter(tracebacks)
        return True

    run_loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in run_loggers:
        logger.addFilter(attach)
    try:
        yield tracebacks
    finally:
        for logger in run_loggers:
            logger.removeFilter(attach)
        for handler in consoles:
            handler.removeFilter(tracebacks)


def server_dies_with_us() -> None:
    """Make Prefect's temporary API server (started when PREFECT_API_URL is unset) die with this process on Linux.

    Prefect stops it at exit, but a process killed with SIGKILL runs no exit code, and the server (a uvicorn
    subprocess) lived on as an orphan. Prefect has no setting for this, so its spawn is patched, here only: the
    server process asks the kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG). Prefect's server
    module takes seconds to import, so the patch is applied when Prefect imports it, not before.
    """
    if not sys.platform.startswith("linux"):
        return
    if SERVER_MODULE in sys.modules:
        _patch_server_spawn(sys.modules[SERVER_MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when Prefect's server module is imported it lets the regular finders find it, and
    patches the module once it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != SERVER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _patch_server_spawn(module)

        spec.loader.exec_module = exec_module
        return spec


def _patch_server_spawn(module: ModuleType) -> None:
    server = module.SubprocessASGIServer
    if getattr(server._run_uvicorn_command, "dies_with_parent", False):
        return
    spawn = server._run_uvicorn_command
    set_death_signal = _death_signal_setter()

    @functools.wraps(spawn)
    def run_uvicorn_command(self):
        # The kernel signals the child when the *thread* that forked it ends: only the main thread lives as long
        # as the process (the command's flows start the server from it).
        if set_death_signal is None or threading.current_thread() is not threading.main_thread():
            return spawn(self)
        popen = subprocess.Popen
        subprocess.Popen = functools.partial(popen, preexec_fn=set_death_signal)
        try:
            return spawn(self)  # its one subprocess.Popen call, made in this thread
        finally:
            subprocess.Popen = popen

    run_uvicorn_command.dies_with_parent = True
    server._run_uvicorn_command = run_uvicorn_command


def _death_signal_setter():
    """A function for a child process to call before it runs its program: SIGTERM when its parent dies. Looked up
    here, in the parent: the child, forked from a process with threads, should do as little as it can."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    return functools.partial(prctl, pr_set_pdeathsig, int(signal.SIGTERM))
