"""`gptflow finetune-classifier`, `gptflow sweep-classifier --grid FIELD=V1,V2...`,
`gptflow classify TEXT... --model PATH`."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from cli import prechecks
from cli.common import VerbConfig, add_folder_options, check_init, stage_config, table
from gptflow.errors import GptflowError


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "finetune-classifier",
        help="fine-tune a GPT text classifier (spam or your CSV), then evaluate it",
        description="Prepares the data (reused if done), fine-tunes with early stopping on validation accuracy "
        "(best checkpoint kept; rerunning resumes), then reports train/validation/test metrics. With dapt (set in a "
        "--config file) the model is first pretrained on the training texts; with --ensemble SEED... one classifier "
        "is trained per seed, in parallel on a Dask cluster (see sweep-classifier --help), and their ensemble (one "
        "checkpoint) is evaluated too. The best spam recipe: --config configs/spam-best.yaml.",
    )
    _add_data_options(p)
    add_folder_options(p, "classify/<data>-<init>-<key>")
    p.set_defaults(handler=run_finetune, stage=VerbConfig("model.configs:ClassifierConfig"), precheck=_check_data)

    p = verbs.add_parser(
        "sweep-classifier",
        help="fine-tune and evaluate a classifier per combination of config values, in parallel",
        description="A hyper-parameter sweep. Each --grid FIELD=V1,V2,... gives a classifier config field the values "
        "to try; every combination is a variant (--grid seed=1,2 --grid lr=1e-4,3e-4: 4 variants), and --config and "
        "the flags set every other field, as for finetune-classifier. Every variant is checked before anything "
        "trains, then each is fine-tuned (after its domain pretraining, with dapt) and evaluated in its own stage "
        "folder, GPTFLOW_HOME/classify/<data>-<init>-<key>, reused or resumed like finetune-classifier's. The "
        "variants train in parallel, as Prefect tasks on a Dask cluster: a local one of GPTFLOW_DASK_WORKERS worker "
        "processes (default 2; each worker's torch gets an equal share of the CPUs), or the scheduler "
        "GPTFLOW_DASK_ADDRESS names (tcp://HOST:8786; its workers need this code, the same GPTFLOW_HOME folder "
        "and a Prefect API they can reach, PREFECT_API_URL). Prints the variants best validation accuracy first "
        "(the same table is the run's 'sweep-<data>' artifact); a variant that fails is reported with its error, "
        "the others are kept, and the command exits 1.",
    )
    _add_data_options(p)
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        type=_grid_option,
        metavar="FIELD=V1,V2,...",
        help="a field and its values, comma-separated (repeat for more fields); e.g. seed=1,2,3 lr=1e-4,3e-4 "
        "epochs=3,5 pooling=last_real,mean",
    )
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start every variant over instead of resuming or reusing its stage folder",
    )
    p.set_defaults(handler=run_sweep, stage=VerbConfig("model.configs:ClassifierConfig"), precheck=_check_data)

    p = verbs.add_parser("classify", help="label texts with a classifier checkpoint or an exported bundle")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--model", required=True, help="classifier checkpoint (best.pt or its folder) or edge bundle")
    p.add_argument("--file", help="a text file (one message per line) or a CSV with a text column")
    p.add_argument("--text-column", default="text", help="text column of a --file CSV (default text)")
    p.add_argument("--int8", action="store_true", help="bundle: use model.int8.onnx")
    p.add_argument("--device", default="auto", help="checkpoint: auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.set_defaults(handler=run_classify, precheck=_check_classify)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default="spam", help="spam, or a labelled CSV/TSV file (with --text-column, --label-column)"
    )
    p.add_argument("--text-column")
    p.add_argument("--label-column")


def _check_data(args: argparse.Namespace) -> None:
    """--data: spam, or a CSV/TSV that decodes and whose header names both columns (before any flow starts)."""
    if args.data != "spam":
        if not Path(args.data).is_file():
            raise GptflowError(f"--data: {args.data} is neither 'spam' nor an existing CSV/TSV file")
        if not args.text_column or not args.label_column:
            raise GptflowError("--data PATH needs --text-column and --label-column")
        prechecks.csv_columns("--data", args.data, args.text_column, args.label_column)


def run_finetune(args: argparse.Namespace) -> int:
    config = stage_config(args)
    check_init(config.init)
    config.check_lora()

    from flows.classify import finetune_classifier_flow
    from tasks.classify import CONFUSION, CURVES

    out = finetune_classifier_flow(
        args.data, config, args.text_column, args.label_column, args.out, args.resume, force=args.force
    )
    if "members" in out:
        print(f"{'reused' if out['reused'] else 'built'}: an ensemble of {len(out['members'])} classifiers")
        print(table([_split_row(m["out_dir"], m["metrics"]) for m in out["members"]]))
        print("the ensemble (mean class probability):")
    else:
        s = out["summary"]
        kept = "final weights" if s.get("keep") == "last" else "best validation accuracy"
        print(
            f"{'reused' if out['reused'] else 'fine-tuned'}: {s['steps']} steps, kept the {kept}: validation "
            f"accuracy {100 * s['best_val_accuracy']:.2f}% at step {s['best_step']}; "
            + (f"LoRA rank {s['lora']['rank']} on {' '.join(s['lora']['targets'])} + head: " if s.get("lora") else "")
            + f"{s['trainable_params']:,} trainable parameters"
        )
    print(
        table(
            [
                {
                    "split": split,
                    "accuracy": f"{100 * m['accuracy']:.2f}%",
                    "macro F1": f"{m['macro_f1']:.4f}",
                    **({"ROC-AUC": f"{m['roc_auc']:.4f}"} if "roc_auc" in m else {}),
                    "n": m["n"],
                }
                for split, m in out["metrics"].items()
            ]
        )
    )
    out_dir = Path(out["out_dir"])
    print(f"model: {out['best']}")
    curves = "" if "members" in out else f"  curves: {out_dir / CURVES}"
    print(f"metrics: {out_dir / 'metrics.json'}{curves}  confusion matrix: {out_dir / CONFUSION}")
    return 0


def _grid_option(text: str) -> tuple[str, list[str]]:
    """--grid FIELD=V1,V2,...: the field (flag spelling accepted) and its values, as text for the config to parse."""
    name, _, values = text.partition("=")
    if not name.strip() or not values.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE[,VALUE...], got {text!r}")
    return name.strip().replace("-", "_"), [v.strip() for v in values.split(",")]


def run_sweep(args: argparse.Namespace) -> int:
    from model.sweep import grid_variants, variant_label

    config = stage_config(args)
    check_init(config.init)
    config.check_lora()
    grid: dict[str, list[str]] = {}
    for name, values in args.grid:
        if name in grid:
            raise GptflowError(f"--grid: {name} is given twice; give all its values at once ({name}=A,B)")
        grid[name] = values
    grid_variants(config, grid)  # a bad field or value: one line before the flow starts

    from flows.sweep import sweep_classifier_flow

    variants = sweep_classifier_flow(args.data, config, grid, args.text_column, args.label_column, args.resume)
    rows = [
        {
            "variant": v["variant"],
            **v["fields"],
            **{split: f"{100 * m['accuracy']:.2f}%" for split, m in v.get("metrics", {}).items()},
            "model": v.get("best", "failed"),
        }
        for v in variants
    ]
    print(f"{len(variants)} variants, best validation accuracy first:")
    print(table(rows))
    failed = [v for v in variants if "error" in v]
    for v in failed:
        print(f"variant {v['variant']} ({variant_label(v['fields'])}) failed: {v['error']}", file=sys.stderr)
    if len(failed) < len(variants):
        print(f"best: {variants[0]['best']}")
    return 1 if failed else 0


def _split_row(out_dir: str, metrics: dict) -> dict:
    """A member's row: its folder and its accuracy on each split."""
    return {"member": Path(out_dir).name, **{split: f"{100 * m['accuracy']:.2f}%" for split, m in metrics.items()}}


def read_texts(path: str, text_column: str) -> list[str]:
    """The texts of --file: a CSV/TSV's text column, else one per non-blank line. Decoded as the data stage decodes a
    CSV (UTF-8, UTF-16 with its byte order mark, else cp1252 with a warning; a binary file is refused)."""
    from data.common import DataError, require_file
    from data.tabular import TabularError, decode

    file = Path(path)
    table = file.suffix.lower() in (".csv", ".tsv")
    try:
        require_file(file, TabularError, "a CSV/TSV with a text column" if table else "a text file, one message a line")
        text, _ = decode(file, file.read_bytes())
    except DataError as exc:
        raise GptflowError(f"--file: {exc}") from None
    if not table:
        return [line for line in text.splitlines() if line.strip()]
    import pandas as pd

    sep = "\t" if file.suffix.lower() == ".tsv" else ","
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        problem = " ".join(str(exc).split())
        raise GptflowError(f"--file: {path} is not a readable {file.suffix[1:].upper()} ({problem})") from None
    if not isinstance(df.index, pd.RangeIndex):  # every row had more fields than the header: pandas made an index
        delimiter = "tab" if sep == "\t" else "comma"
        raise GptflowError(
            f"--file: {path}: its rows hold more fields than its header names ({', '.join(df.columns)}); quote "
            f"fields that contain the delimiter ({delimiter})"
        )
    if text_column not in df.columns:
        raise GptflowError(
            f"--file: {path} has no column {text_column!r} (columns: {', '.join(df.columns)}); pass --text-column"
        )
    return df[text_column].tolist()


def _is_bundle(model: Path) -> bool:
    return (model / "manifest.json").is_file() and (model / "model.onnx").is_file()


def _texts(args: argparse.Namespace) -> list[str]:
    """The TEXT arguments, then --file's texts; an empty one is refused (a model would read it as one end-of-text
    token and answer with confidence about nothing)."""
    from_file = read_texts(args.file, args.text_column) if args.file else []
    texts = list(args.texts) + from_file
    if not texts:
        raise GptflowError("nothing to classify: give TEXT arguments or --file")
    for i, text in enumerate(texts):
        if not str(text).strip():
            where = f"TEXT {i + 1}" if i < len(args.texts) else f"--file {args.file}: row {i - len(args.texts) + 1}"
            raise GptflowError(f'{where} is empty; give the text to classify, e.g. "Call now to claim your prize"')
    return texts


def _check_classify(args: argparse.Namespace) -> None:
    """The texts, then --model: a bundle, or a checkpoint's zip directory (before PyTorch is imported)."""
    _texts(args)
    if args.int8 and not _is_bundle(Path(args.model)):
        raise GptflowError("--int8 applies to an exported bundle; export with `gptflow export --int8`")
    prechecks.classifier(args.model)


def run_classify(args: argparse.Namespace) -> int:
    texts = _texts(args)
    model = Path(args.model)
    if _is_bundle(model):
        from edge.runtime import EdgeClassifier

        predictions = EdgeClassifier(model, int8=args.int8).predict(texts)
    else:
        if args.int8:
            raise GptflowError("--int8 applies to an exported bundle; export with `gptflow export --int8`")
        predictions = _torch_predict(model, texts, args.device)
    for text, (label, prob) in zip(texts, predictions):
        sys.stdout.write(f"{label}\t{prob:.4f}\t{text}\n")
    return 0


def _torch_predict(path: Path, texts: list[str], device: str) -> list[tuple[str, float]]:
    from edge import finite_logits
    from edge.text import encode_texts, softmax
    from model.classifier import predict_logits
    from model.device import resolve_device
    from model.files import CLASSIFIERS
    from model.opener import open_model

    loaded = open_model(path, CLASSIFIERS).classifier()
    model = loaded.model.to(resolve_device(device))
    # the texts are read with the tokenizer the classifier was fine-tuned with (its backbone's own, or GPT-2's)
    logits = predict_logits(model, encode_texts(loaded.tokenizer(), texts, loaded.max_length))
    probs = softmax(finite_logits(logits, loaded.path))
    return [(loaded.names[k], float(p[k])) for p, k in zip(probs, probs.argmax(axis=1))]
