"""The `gptflow` console command: one verb per Prefect flow (litgpt-style).

Each verb lives in a module of this package with a `register(subparsers)` function that adds its
parser and sets `handler` (and `stage`, the config its options are generated from: `cli.common`). Flows, and
the config of the verb being run, are imported only when needed, so `gptflow --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from cli.common import add_stage_options, validated_stage_config
from cli.prechecks import config_file
from cli.runtime import server_dies_with_us, tracebacks_to_file
from gptflow.errors import GptflowError
from gptflow.settings import get_settings, writable_folder

VERB_MODULES = [
    "cli.pipeline",
    "cli.data",
    "cli.evaluate",
    "cli.model",
    "cli.classify",
    "cli.export",
    "cli.merge",
    "cli.publish",
    "cli.instruct",
    "cli.inspect",
    "cli.registry",
]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The command's parser; the verb being run gets its stage's options (importing its config)."""
    parser = Parser(
        prog="gptflow",
        description="Data-to-deployment pipeline for GPT-style language models (Prefect flows).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).register(verbs)
    verb = verbs.choices.get(_verb(argv) or "")
    if verb is not None and verb.get_default("stage"):
        add_stage_options(verb, verb.get_default("stage"))
    return parser


def _verb(argv: list[str]) -> str | None:
    """The verb being run, if any: the first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _prepare_environment() -> None:
    """Prefect reads its settings at import: keep its state local and analytics off unless set."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_HOME"):  # Prefect does not create missing parents, and then cannot start
        home = Path(os.environ["PREFECT_HOME"]).expanduser()
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GptflowError(
                f"invalid settings: PREFECT_HOME: cannot create {home} ({exc.strerror}); expected a writable folder"
            ) from None
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    # Warnings of the plain layers (e.g. an encoding fallback) reach the run logs too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "gptflow,data,model,eval")


def main(argv: list[str] | None = None) -> int:
    from edge import BundleError  # edge imports nothing of ours: its error is not a GptflowError
    from gptflow.ranks import process_ranks

    argv = sys.argv[1:] if argv is None else argv
    try:
        # Before any verb's config is imported: `import ollama` itself parses OLLAMA_HOST. A bad GPTFLOW_* /
        # OLLAMA_HOST / PREFECT_HOME value stops every verb here, naming the variable.
        settings = get_settings()
        _prepare_environment()  # before anything imports Prefect
    except GptflowError as exc:
        print(f"gptflow{' ' + _verb(argv) if _verb(argv) else ''}: error: {exc}", file=sys.stderr)
        return 2
    # SIGTERM (a scheduler stopping us) unwinds like Ctrl-C, so Prefect stops its ephemeral server; the exit
    # status still tells the two apart, as a shell does: 128 + the signal's number.
    stopped_by = [signal.SIGINT]

    def on_sigterm(signum: int, frame) -> None:
        stopped_by[0] = signal.SIGTERM
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    server_dies_with_us()  # and SIGKILL, which no handler sees, takes it down too
    args = build_parser(argv).parse_args(argv)  # the stage configs are PyTorch-free (model.configs)
    log_file = settings.home / "logs" / f"{args.verb}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    with tracebacks_to_file(log_file) as tracebacks:
        try:
            # What can be checked without a flow, before the verb imports torch or Prefect: a bad input is one line
            # within a second or so.
            _precheck(args)
            if getattr(args, "stage", None) is not None:
                validated_stage_config(args)
            ranks = process_ranks()  # half-set torchrun variables stop here
            if ranks.distributed:
                result = _run_distributed(args, ranks.is_main)
            else:
                result = args.handler(args)
        except KeyboardInterrupt:
            how = "terminated (SIGTERM)" if stopped_by[0] == signal.SIGTERM else "interrupted"
            print(f"gptflow {args.verb}: {how}; finished stages and checkpoints are kept", file=sys.stderr)
            return 128 + stopped_by[0]
        except (GptflowError, BundleError, OSError) as exc:
            message = str(exc) if isinstance(exc, (GptflowError, BundleError)) else _home_error(exc, settings.home)
            if message is None:  # any other OSError is a bug: it keeps its traceback
                raise
            where = f" (traceback: {tracebacks.path})" if tracebacks.used else ""
            print(f"gptflow {args.verb}: error: {message}{where}", file=sys.stderr)
            return 2
    return int(result or 0)


def _precheck(args: argparse.Namespace) -> None:
    """The checks of `cli.prechecks` a verb names, and its output folder; before any flow starts."""
    _check_out_folder(args)
    if getattr(args, "stage", None) is not None and getattr(args, "config", None):
        config_file("--config", args.config)  # its fields are the stage config's to check (cli.common)
    if precheck := getattr(args, "precheck", None):
        precheck(args)


def _check_out_folder(args: argparse.Namespace) -> None:
    """--out / --out-dir must be a folder that can be written or created: one line before any flow starts."""
    for name in ("out", "out_dir"):
        if value := getattr(args, name, None):
            try:
                writable_folder(Path(value))
            except ValueError as exc:
                raise GptflowError(f"--{name.replace('_', '-')}: {exc}") from None


def _home_error(exc: OSError, home: Path) -> str | None:
    """A path under GPTFLOW_HOME that cannot be made or written (a file where a folder should be, a read-only
    folder), in one line naming the variable; None for any other OSError."""
    if exc.filename is None or not isinstance(exc, (PermissionError, NotADirectoryError, FileExistsError)):
        return None
    path = Path(os.fsdecode(exc.filename)).absolute()
    if not path.is_relative_to(home.absolute()):
        return None
    # mkdir over a file says "File exists": what is wrong is that the file is where a folder should be
    reason = "a file, not a folder" if isinstance(exc, FileExistsError) and path.is_file() else exc.strerror
    return (
        f"cannot write {path} ({reason}): GPTFLOW_HOME={home} must be a folder you can write in; "
        "set GPTFLOW_HOME to another folder"
    )


def _run_distributed(args: argparse.Namespace, is_main: bool) -> int | None:
    """`torchrun ... gptflow VERB`: rank 0 runs the verb (flows, reports, artifacts) and every other rank joins
    the training stages it calls (model.distributed)."""
    from model import distributed

    try:
        if not is_main:
            distributed.follow()
            return 0
        with distributed.lead():
            return args.handler(args)
    finally:
        distributed.destroy()
