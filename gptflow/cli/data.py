"""`gptflow data spam | instructions | corpus NAME|PATH | csv PATH`."""

from __future__ import annotations

import argparse


def register(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("data", help="download, clean, balance and split a data set")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    kinds.add_parser("spam", help="the UCI SMS Spam Collection").set_defaults(handler=_todo)


def _todo(args: argparse.Namespace) -> int:
    raise NotImplementedError("being built")
