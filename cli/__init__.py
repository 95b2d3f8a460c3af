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
from pathlib import Path
from typing import NoReturn

from cli.common import add_stage_options

VERB_MODULES = [
    "cli.pipeline",
    "cli.data",
    "cli.evaluate",
    "cli.model",
    "cli.classify",
    "cli.instruct",
    "cli.inspect",
]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, like every other bad input
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(
        prog="gptflow",
        description="Data-to-deployment pipeline for GPT-style language models (Prefect flows).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).register(verbs)
    verb = verbs.choices.get(next((a for a in argv if not a.startswith("-")), ""))  # the verb being run, if any
    if verb is not None and verb.get_default("stage"):
        add_stage_options(verb, verb.get_default("stage"))
    return parser


def _prepare_environment() -> None:
    """Prefect reads its settings at import: keep its state local and analytics off unless set."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_HOME"):  # Prefect does not create missing parents, and then cannot start
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    # Warnings of the plain layers (e.g. an encoding fallback) reach the run logs too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "gptflow,data,model,eval")


def main(argv: list[str] | None = None) -> int:
    from edge import BundleError  # edge imports nothing of ours: its error is not a GptflowError
    from gptflow.errors import GptflowError
    from gptflow.ranks import process_ranks
    from gptflow.settings import get_settings

    _prepare_environment()  # before anything imports Prefect
    # SIGTERM (a scheduler stopping us) unwinds like Ctrl-C, so Prefect stops its ephemeral server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        get_settings()  # a bad GPTFLOW_* / OLLAMA_HOST value stops every verb here, naming the variable
        ranks = process_ranks()  # half-set torchrun variables stop here too
        if ranks.distributed:
            result = _run_distributed(args, ranks.is_main)
        else:
            result = args.handler(args)
    except (GptflowError, BundleError) as exc:
        print(f"gptflow {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptflow {args.verb}: interrupted; finished stages and checkpoints are kept", file=sys.stderr)
        return 130
    return int(result or 0)


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
