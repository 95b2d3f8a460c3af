"""Spam test accuracy with no GPT-2 weights: the shipped recipe trained and exported by the product's own verbs,
beside a TF-IDF + logistic-regression baseline on the same split, with wall times.

    GPTFLOW_MIRROR=../shared/mirror .venv/bin/python -m bench.classify_accuracy [--config configs/spam-best.yaml] \
        [--ensemble 41 42 43]

1. `gptflow finetune-classifier --config configs/spam-best.yaml`: one classifier per ensemble seed (domain-adaptive
   pretraining on the training texts, then fine-tuning; model/dapt.py, model/classifier.py), then their ensemble;
2. `gptflow export ENSEMBLE --int8`: one ONNX graph for the ensemble, fp32 and int8, parity and the int8 gate;
3. TF-IDF (word 1-2 grams + char 2-5 grams) + logistic regression on the same train split, C picked on the
   validation split.
Reported: each member's test accuracy and their mean, the ensemble in PyTorch and in the exported ONNX fp32 / int8
graphs, TF-IDF; the wall time of each step. Stages are reused when GPTFLOW_HOME already holds them (then the table
says so and the time is not a training time): point GPTFLOW_HOME at an empty folder to measure. The 2 cores may be
shared with other work: wall times are noisy, accuracies are not. scikit-learn is a bench-only dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from data.spam import spam_dir
from gptflow.settings import get_settings

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "spam-best.yaml"


def gptflow(*argv: str) -> tuple[str, float]:
    """Run a `gptflow` verb (its output streams through); its stdout and wall time."""
    print(f"$ gptflow {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cli", *argv], cwd=REPO, stdout=subprocess.PIPE, text=True, env=os.environ
    )
    print(done.stdout, flush=True)
    if done.returncode:
        sys.exit(f"gptflow {argv[0]} failed with exit status {done.returncode}")
    return done.stdout, time.perf_counter() - t0


def printed_path(stdout: str, prefix: str) -> Path:
    return Path(next(line for line in stdout.splitlines() if line.startswith(prefix)).split()[1])


def tfidf_baseline(data_dir: Path) -> tuple[float, float]:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    train, val, test = (
        pd.read_csv(data_dir / f"{s}.csv", keep_default_na=False) for s in ("train", "validation", "test")
    )
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    fit = lambda texts: hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()  # noqa: E731
    tf = lambda texts: hstack([word.transform(texts), char.transform(texts)]).tocsr()  # noqa: E731
    x_train = fit(train["text"])
    best = max(
        (LogisticRegression(C=c, max_iter=2000).fit(x_train, train["label"]).score(tf(val["text"]), val["label"]), c)
        for c in (1, 3, 10, 30, 100)
    )
    clf = LogisticRegression(C=best[1], max_iter=2000).fit(x_train, train["label"])
    return float(clf.score(tf(test["text"]), test["label"])), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(RECIPE), help="the classifier recipe (default configs/spam-best.yaml)")
    parser.add_argument("--ensemble", nargs="+", metavar="SEED", help="override the recipe's ensemble seeds")
    args = parser.parse_args()
    extra = ["--ensemble", *args.ensemble] if args.ensemble else []

    stdout, train_s = gptflow("finetune-classifier", "--config", args.config, *extra)
    ensemble_dir = printed_path(stdout, "model:").parent
    trained = json.loads((ensemble_dir / "manifest.json").read_text())
    members = [
        {"name": Path(m["checkpoint"]).parent.name, "test": m["accuracy"]["test"], "val": m["accuracy"]["validation"]}
        for m in trained["metrics"]["members"]
    ]
    ensemble_test = json.loads((ensemble_dir / "metrics.json").read_text())["reports"]["test"]
    stdout, export_s = gptflow("export", str(ensemble_dir / "best.pt"), "--int8")
    bundle = printed_path(stdout, "bundle:")
    exported = json.loads((bundle.parent / "export_report.json").read_text())
    data_dir = spam_dir(get_settings())
    tfidf_acc, tfidf_s = tfidf_baseline(data_dir)

    n = exported["test_n"]
    reused = any(line.startswith("reused") for line in stdout.splitlines())
    errors = lambda acc: round(n * (1 - acc))  # noqa: E731
    print(f"\n| model (spam test split, n={n}) | val acc | test accuracy | errors | wall time |")
    print("|---|---|---|---|---|")
    for m in members:
        print(f"| member {m['name']} | {100 * m['val']:.2f}% | {100 * m['test']:.2f}% | {errors(m['test'])} | |")
    mean = sum(m["test"] for m in members) / len(members)
    print(f"| members' mean ({len(members)} seeds) | | {100 * mean:.2f}% | | {train_s / len(members):.0f} s each |")
    print(
        f"| ensemble, PyTorch fp32 | | {100 * ensemble_test['accuracy']:.2f}% | {errors(ensemble_test['accuracy'])} | "
        f"{train_s:.0f} s (all members){' (stages reused)' if reused else ''} |"
    )
    for name in ("onnx_fp32", "onnx_int8"):
        acc = exported["accuracy"][name]
        print(f"| ensemble, exported {name} | | {100 * acc:.2f}% | {errors(acc)} | {export_s:.0f} s (export) |")
    print(f"| TF-IDF + logistic regression | | {100 * tfidf_acc:.2f}% | {errors(tfidf_acc)} | {tfidf_s:.1f} s |")
    int8 = exported["accuracy"]["onnx_int8"]
    verdict = "MET" if int8 >= 0.98 else "NOT MET"
    print(f"target: the shipped ensemble bundle (int8) >= 98.0% on the test split: {100 * int8:.2f}%: {verdict}")
    print(f"bundle: {bundle}")


if __name__ == "__main__":
    main()
