"""`gptflow data spam | instructions [PATH] | corpus NAME|PATH | csv PATH --text-column C --label-column L`."""

from __future__ import annotations

import argparse

from pydantic import BaseModel, ValidationError

from data.config import (
    CorpusConfig,
    CsvDataConfig,
    InstructionDataConfig,
    LabelledDataConfig,
    SpamDataConfig,
)
from gptflow.errors import GptflowError


def register(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("data", help="download, clean, balance and split a data set")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")

    spam = kinds.add_parser("spam", help="the UCI SMS Spam Collection -> train/validation/test CSVs")
    _labelled_options(spam)
    spam.set_defaults(handler=_spam)

    csv = kinds.add_parser("csv", help="your labelled CSV/TSV -> the same clean/balance/split as spam")
    csv.add_argument("path", help="CSV or TSV file with a header row")
    csv.add_argument("--text-column", required=True, help="column holding the text")
    csv.add_argument("--label-column", required=True, help="column holding the class label")
    _labelled_options(csv)
    csv.set_defaults(handler=_csv)

    inst = kinds.add_parser("instructions", help="instruction/response JSON -> train/validation/test JSON")
    inst.add_argument("path", nargs="?", help="JSON list of {instruction, input, output} (default: the book's)")
    inst.add_argument("--seed", type=int, default=InstructionDataConfig().seed, help="seed of the shuffle")
    inst.add_argument("--book-split", action="store_true",
                      help="the book's unshuffled split (file order: train, test, then validation)")
    inst.set_defaults(handler=_instructions)

    corpus = kinds.add_parser("corpus", help="a text corpus -> GPT-2 tokens in uint16 train.bin/val.bin")
    corpus.add_argument("corpus", metavar="NAME|PATH", help="the-verdict, tinyshakespeare or a UTF-8 text file")
    corpus.add_argument("--val-fraction", type=float, default=CorpusConfig().val_fraction)
    corpus.set_defaults(handler=_corpus)


def _labelled_options(parser: argparse.ArgumentParser) -> None:
    defaults = LabelledDataConfig()
    parser.add_argument("--balance", choices=["undersample", "none"], default=defaults.balance,
                        help="undersample every class to the smallest (default) or keep the natural ratio")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of balancing and splitting")


def _config(model: type[BaseModel], **values) -> BaseModel:
    """Build a stage config from options; a bad value is a one-line error naming the option."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        option = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
        raise GptflowError(f"{option}: {err['msg']}") from None


def _spam(args: argparse.Namespace) -> int:
    from flows.data import prepare_spam

    _print_labelled(prepare_spam(_config(SpamDataConfig, balance=args.balance, seed=args.seed)))
    return 0


def _csv(args: argparse.Namespace) -> int:
    from flows.data import prepare_csv

    config = _config(CsvDataConfig, text_column=args.text_column, label_column=args.label_column,
                     balance=args.balance, seed=args.seed)
    _print_labelled(prepare_csv(args.path, config))
    return 0


def _instructions(args: argparse.Namespace) -> int:
    from flows.data import prepare_instructions
    from data.instructions import summary_rows

    outcome = prepare_instructions(args.path, _config(InstructionDataConfig, seed=args.seed, book_split=args.book_split))
    print(_table([{"step": k, "entries": v} for k, v in outcome["report"]["cleaning"].items()]), end="\n\n")
    print(_table(summary_rows(outcome["report"])), end="\n\n")
    _print_where(outcome, ["train.json", "validation.json", "test.json", "report.json"])
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from flows.data import prepare_corpus
    from data.corpus import summary_rows

    outcome = prepare_corpus(args.corpus, _config(CorpusConfig, val_fraction=args.val_fraction))
    print(_table(summary_rows(outcome["report"])), end="\n\n")
    _print_where(outcome, ["train.bin", "val.bin", "meta.json"])
    return 0


def _print_labelled(outcome: dict) -> None:
    from data.labelled import summary_rows

    report = outcome["report"]
    print(f"labels: {report['labels']}")
    print(_table([{"step": k, "rows": v} for k, v in report["cleaning"].items()]), end="\n\n")
    bal = report["balance"]
    print(f"balance ({bal['method']}): {bal['before']} -> {bal['after']}\n")
    print(_table(summary_rows(report)), end="\n\n")
    _print_where(outcome, ["train.csv", "validation.csv", "test.csv", "labels.json", "unused.csv",
                           "report.json"])


def _print_where(outcome: dict, files: list[str]) -> None:
    state = "reused (same inputs and config)" if outcome["reused"] else "written"
    print(f"outputs {state}: {outcome['out_dir']}\n  {' '.join(files)}")


def _table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned plain-text table (columns in first-seen order, blanks for gaps)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) if v.replace(".", "").isdigit() else v.ljust(w) for v, w in zip(r, widths))
              for r in cells]
    return "\n".join(line.rstrip() for line in lines)
