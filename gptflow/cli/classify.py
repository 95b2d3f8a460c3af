"""`gptflow finetune-classifier`, `gptflow export CHECKPOINT [--int8]`, `gptflow classify TEXT... --model PATH`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptflow.errors import GptflowError


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "finetune-classifier", help="fine-tune a GPT text classifier (spam or your CSV), then evaluate it",
        description="Prepares the data (reused if done), fine-tunes with early stopping on validation accuracy "
        "(best checkpoint kept; rerunning resumes), then reports train/validation/test metrics.")
    p.add_argument("--data", default="spam", help="spam, or a labelled CSV/TSV file (with --text-column, "
                   "--label-column)")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--init", help="random (default) | gpt2:NAME|PATH | checkpoint:PATH (our pretraining)")
    p.add_argument("--preset", help="model preset for --init random (default mini)")
    p.add_argument("--trainable", choices=["head", "last_k", "all"])
    p.add_argument("--last-k", type=int, help="blocks trained with --trainable last_k (default 1)")
    p.add_argument("--pooling", choices=["last_real", "last_position", "mean"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: context)")
    p.add_argument("--patience", type=int, help="stop after N evaluations without a better validation accuracy")
    p.add_argument("--keep", choices=["best_val", "last"], help="best_val (default): the weights at the best "
                   "validation accuracy; last: the final weights of the whole schedule (no early stopping)")
    p.add_argument("--eval-every", type=int, help="validate every N steps (default: each epoch)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--out", help="output folder (default GPTFLOW_HOME/classify/<data>-<init>-<config hash>)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    p.set_defaults(handler=run_finetune)

    p = verbs.add_parser("export", help="export a classifier to ONNX (+ int8) and write the edge bundle",
                         description="Checks fp32 parity with PyTorch and int8 agreement on the whole test split "
                         "and fails when int8 loses more than --max-int8-drop accuracy points.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="classifier best.pt, or its fine-tuning folder")
    p.add_argument("--int8", action="store_true", help="also quantize to int8 (torch and ONNX) and gate it")
    p.add_argument("--max-int8-drop", type=float, help="allowed int8 test-accuracy drop in points (default 1)")
    p.add_argument("--data", help="data folder with test.csv (default: the one it was fine-tuned on)")
    p.add_argument("--out", help="output folder (default GPTFLOW_HOME/export/<checkpoint folder>-<config hash>)")
    p.set_defaults(handler=run_export)

    p = verbs.add_parser("classify", help="label texts with a classifier checkpoint or an exported bundle")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--model", required=True, help="classifier checkpoint (best.pt or its folder) or edge bundle")
    p.add_argument("--file", help="a text file (one message per line) or a CSV with a text column")
    p.add_argument("--text-column", default="text", help="text column of a --file CSV (default text)")
    p.add_argument("--int8", action="store_true", help="bundle: use model.int8.onnx")
    p.set_defaults(handler=run_classify)


def _config(model, what: str, **values):
    from pydantic import ValidationError

    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        option = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else what
        raise GptflowError(f"{option}: {err['msg']}") from None


def run_finetune(args: argparse.Namespace) -> int:
    from model.classifier import ClassifierConfig
    from model.config import GPTConfig

    fields = ["init", "preset", "trainable", "last_k", "pooling", "epochs", "lr", "weight_decay", "batch_size",
              "max_length", "patience", "keep", "eval_every", "warmup_steps", "dropout", "seed", "threads", "bf16"]
    config = _config(ClassifierConfig, "options", **{f: getattr(args, f) for f in fields})
    GPTConfig.from_preset(config.preset)  # unknown preset: one line before any flow starts
    kind, _, arg = config.init.partition(":")
    if kind == "checkpoint" and not Path(arg).exists():
        raise GptflowError(f"--init: checkpoint {arg} does not exist")
    if args.data != "spam":
        if not Path(args.data).is_file():
            raise GptflowError(f"--data: {args.data} is neither 'spam' nor an existing CSV/TSV file")
        if not args.text_column or not args.label_column:
            raise GptflowError("--data PATH needs --text-column and --label-column")

    from flows.classify import finetune_classifier_flow

    out = finetune_classifier_flow(args.data, config, args.text_column, args.label_column, args.out, args.resume)
    s = out["summary"]
    kept = "final weights" if s.get("keep") == "last" else "best validation accuracy"
    print(f"{'reused' if out['reused'] else 'fine-tuned'}: {s['steps']} steps, kept the {kept}: validation "
          f"accuracy {100 * s['best_val_accuracy']:.2f}% at step {s['best_step']}")
    for split, m in out["metrics"].items():
        auc = f", ROC-AUC {m['roc_auc']:.4f}" if "roc_auc" in m else ""
        print(f"{split:10s} accuracy {100 * m['accuracy']:.2f}%  macro F1 {m['macro_f1']:.4f}{auc}  (n={m['n']})")
    out_dir = Path(out["out_dir"])
    print(f"model: {out['best']}")
    print(f"metrics: {out_dir / 'metrics.json'}  curves: {out_dir / 'curves.png'}  "
          f"confusion matrix: {out_dir / 'confusion_test.png'}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from model.classifier import load_classifier
    from model.onnx_export import ExportConfig

    loaded = load_classifier(args.checkpoint)  # not a classifier: one-line error before the flow
    data_dir = args.data or loaded.data_dir
    if not data_dir or not (Path(data_dir) / "test.csv").is_file():
        raise GptflowError(f"--data: no test.csv in {data_dir}; pass the data folder the classifier was tuned on")
    config = _config(ExportConfig, "options", int8=args.int8, max_int8_drop=args.max_int8_drop)

    from flows.export import export_flow

    report = export_flow(str(loaded.path), str(data_dir), config, args.out)
    for name, acc in report["accuracy"].items():
        print(f"{name:11s} test accuracy {100 * acc:.2f}%")
    p = report["parity"]
    print(f"parity: max |logit diff| {p['fp32_max_abs_logit_diff']:.2e}, "
          f"{p['fp32_prediction_matches']}/{p['n']} predictions equal"
          + (f", int8 agreement {100 * p['int8_agreement']:.2f}%" if "int8_agreement" in p else ""))
    for name, size in report["sizes_bytes"].items():
        print(f"{name}: {size / 1e6:.1f} MB")
    print(f"bundle: {report['bundle']}  (run: python -m edge {report['bundle']} \"text\")")
    return 0


def read_texts(path: str, text_column: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise GptflowError(f"--file: {path} does not exist")
    if file.suffix.lower() in (".csv", ".tsv"):
        import pandas as pd

        sep = "\t" if file.suffix.lower() == ".tsv" else ","
        df = pd.read_csv(file, sep=sep, dtype=str, keep_default_na=False)
        if text_column not in df.columns:
            raise GptflowError(f"--file: {path} has no column {text_column!r} (columns: {', '.join(df.columns)}); "
                               "pass --text-column")
        return df[text_column].tolist()
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_classify(args: argparse.Namespace) -> int:
    texts = list(args.texts) + (read_texts(args.file, args.text_column) if args.file else [])
    if not texts:
        raise GptflowError("nothing to classify: give TEXT arguments or --file")
    model = Path(args.model)
    if (model / "manifest.json").is_file() and (model / "model.onnx").is_file():
        from edge.runtime import EdgeClassifier

        predictions = EdgeClassifier(model, int8=args.int8).predict(texts)
    else:
        if args.int8:
            raise GptflowError("--int8 applies to an exported bundle; export with `gptflow export --int8`")
        predictions = _torch_predict(model, texts)
    for text, (label, prob) in zip(texts, predictions):
        sys.stdout.write(f"{label}\t{prob:.4f}\t{text}\n")
    return 0


def _torch_predict(path: Path, texts: list[str]) -> list[tuple[str, float]]:
    from edge.text import encode_texts, softmax
    from gptflow.tokenizer import get_tokenizer
    from model.classifier import load_classifier, predict_logits

    loaded = load_classifier(path)
    probs = softmax(predict_logits(loaded.model, encode_texts(get_tokenizer(), texts, loaded.max_length)))
    return [(loaded.names[k], float(p[k])) for p, k in zip(probs, probs.argmax(axis=1))]
