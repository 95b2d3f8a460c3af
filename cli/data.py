"""`gptflow data spam | instructions [PATH] | corpus NAME|PATH | csv PATH --text-column C --label-column L`."""

from __future__ import annotations

import argparse

from cli import prechecks
from cli.common import VerbConfig, add_stage_options, stage_config, table


def register(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("data", help="download, clean, balance and split a data set")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    spam = kinds.add_parser("spam", help="the UCI SMS Spam Collection -> train/validation/test CSVs")
    add_stage_options(spam, VerbConfig("data.config:SpamDataConfig"))
    spam.set_defaults(handler=_spam)

    csv = kinds.add_parser("csv", help="your labelled CSV/TSV -> the same clean/balance/split as spam")
    csv.add_argument(
        "path",
        help="CSV or TSV file with a header row (UTF-8, cp1252 or UTF-16 with a BOM); unquoted commas that spilled "
        "a last text column into unnamed trailing columns are joined back and counted",
    )
    add_stage_options(csv, VerbConfig("data.config:CsvDataConfig"))
    csv.set_defaults(handler=_csv)

    inst = kinds.add_parser(
        "instructions", help="instruction/response JSON or JSON Lines -> train/validation/test JSON"
    )
    inst.add_argument(
        "path",
        nargs="?",
        help="JSON list, or JSON Lines (one object a line), of {instruction, input, output} (default: the book's)",
    )
    add_stage_options(inst, VerbConfig("data.config:InstructionDataConfig"))
    inst.set_defaults(handler=_instructions)

    corpus = kinds.add_parser("corpus", help="a text corpus -> GPT-2 tokens in uint16 train.bin/val.bin")
    corpus.add_argument("corpus", metavar="NAME|PATH", help="the-verdict, tinyshakespeare or a UTF-8 text file")
    add_stage_options(corpus, VerbConfig("data.config:CorpusConfig"))
    corpus.set_defaults(handler=_corpus)


# Each verb checks its config and its file before it imports its flow (and Prefect): `cli.prechecks`.


def _spam(args: argparse.Namespace) -> int:
    config = stage_config(args)

    from flows.prepare import prepare_spam

    _print_labelled(prepare_spam(config))
    return 0


def _csv(args: argparse.Namespace) -> int:
    config = stage_config(args)
    prechecks.csv_columns(None, args.path, config.text_column, config.label_column)

    from flows.prepare import prepare_csv

    _print_labelled(prepare_csv(args.path, config))
    return 0


def _instructions(args: argparse.Namespace) -> int:
    config = stage_config(args)
    if args.path is not None:
        prechecks.instructions(None, args.path, config)

    from data.instructions import summary_rows
    from flows.prepare import prepare_instructions

    outcome = prepare_instructions(args.path, config)
    print(table([{"step": k, "entries": v} for k, v in outcome["report"]["cleaning"].items()]), end="\n\n")
    print(table(summary_rows(outcome["report"])), end="\n\n")
    _print_where(outcome, ["train.json", "validation.json", "test.json", "report.json"])
    return 0


def _corpus(args: argparse.Namespace) -> int:
    config = stage_config(args)
    prechecks.corpus(None, args.corpus)

    from data.corpus import summary_rows
    from flows.prepare import prepare_corpus

    outcome = prepare_corpus(args.corpus, config)
    print(table(summary_rows(outcome["report"])), end="\n\n")
    _print_where(outcome, ["train.bin", "val.bin", "meta.json"])
    return 0


def _print_labelled(outcome: dict) -> None:
    from data.labelled import summary_rows
    from data.tabular import rejoined_note

    report = outcome["report"]
    if report["read"].get("spilled_texts_rejoined"):
        print(rejoined_note(report["read"]))
    print(f"labels: {report['labels']}")
    print(table([{"step": k, "rows": v} for k, v in report["cleaning"].items()]), end="\n\n")
    bal = report["balance"]
    print(f"balance ({bal['method']}): {bal['before']} -> {bal['after']}\n")
    print(table(summary_rows(report)), end="\n\n")
    _print_where(outcome, ["train.csv", "validation.csv", "test.csv", "labels.json", "unused.csv", "report.json"])


def _print_where(outcome: dict, files: list[str]) -> None:
    state = "reused (same inputs and config)" if outcome["reused"] else "written"
    print(f"outputs {state}: {outcome['out_dir']}\n  {' '.join(files)}")
