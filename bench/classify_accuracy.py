"""Spam test accuracy with no GPT-2 weights, beside a TF-IDF + logistic-regression baseline, with wall time.

    GPTFLOW_MIRROR=../shared/mirror .venv/bin/python -m bench.classify_accuracy [--dapt-steps 800] \
        [--dapt-seeds 11,12] [--seeds 123]
    ... -m bench.classify_accuracy --dapt-seeds 7 --seeds 123,7,99    # the fine-tuning seeds' spread on one DAPT

By default: two classifiers, one per DAPT seed, and their ensemble (about 9 minutes).

The recipe (configs/spam-best.yaml; each DAPT checkpoint is shared by the fine-tuning seeds):
1. Domain-adaptive pretraining (DAPT) of a 6x256 GPT from random init on the training split's texts plus the
   unused (balanced-away) messages; never a validation or test text. Random 64-token windows of the message
   stream, batch 32, AdamW lr 2e-3 with warmup + cosine, precision auto (bf16 where it is faster), in a compact
   vocabulary (the tokens that occur in that corpus), saved back in GPT-2 token ids.
2. Fine-tune all weights as a classifier (model/classifier.py, head on the last real token) for the whole
   cosine schedule and keep the final weights (`keep="last"`, no early stopping). Once per fine-tuning seed:
   on 898 training messages the seed alone moves test accuracy by a point or more, so one seed would mislead.
3. Test accuracy of each classifier and their mean, and of their ensemble (the mean of their class
   probabilities); TF-IDF (word 1-2 grams + char 2-5 grams) + logistic regression on the same train split, C
   picked on the validation split.
The DAPT seed moves test accuracy as much as the fine-tuning seed (means over 3 fine-tuning seeds: 97.4-98.6%
for DAPT seeds 2026, 7, 123): read the spread, not one number; an ensemble over DAPT seeds removes most of it.
The 2 cores may be shared with other work: wall times are noisy, accuracies are not.
scikit-learn is a bench-only dependency.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from data.spam import prepare_spam
from eval.metrics import classification_report
from gptflow.download import fetch_source
from gptflow.settings import get_settings
from gptflow.stage import Stage
from gptflow.storage import sha256_bytes
from gptflow.tokenizer import EOT_ID, get_tokenizer
from model.checkpoint import save_model
from model.classifier import (
    ClassifierConfig,
    encode_split,
    finetune,
    load_classifier,
    load_labels,
    predict_logits,
    read_split,
)
from model.config import GPTConfig
from model.gpt import GPTModel
from model.pretrain import PretrainConfig, TokenWindows, lm_loss
from model.training import train

# The recipe and the measurements behind each choice: configs/spam-best.yaml.
RECIPE = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "spam-best.yaml").read_text())
SHAPE = GPTConfig(**RECIPE["shape"])
DAPT_STEPS = RECIPE["dapt"]["steps"]
DAPT_SEEDS = tuple(RECIPE["dapt"]["seeds"])
FINETUNE = ClassifierConfig(**RECIPE["classifier"])


def work_dir(home: Path) -> Path:
    return home / "bench" / "classify_accuracy"


def classifier_dir(home: Path, dapt_seed: int = DAPT_SEEDS[0], seed: int = FINETUNE.seed) -> Path:
    """Where a run writes the classifier of one DAPT seed and fine-tuning seed (bench/edge.py reads it)."""
    return work_dir(home) / f"classifier-dapt{dapt_seed}-seed{seed}"


def pretrain_domain(texts: list[str], tokenizer, steps: int, out: Path, *, seed: int = 123) -> dict:
    """Next-token pretraining on `texts` (EOT between messages) in a compact vocabulary, saved in GPT-2 ids to
    `out/model.pt`, through the one training loop (model.training) with the recipe's DAPT config.

    The corpus uses about 1/5 of GPT-2's 50257 tokens. Training a model whose vocabulary is only those tokens
    is the same objective on this corpus (a full softmax over every token that can occur as a target) without
    the cost of embedding rows and optimizer state it would never touch. Afterwards the trained rows are
    scattered into a full-vocabulary GPTModel; tokens the corpus lacks keep their random init.
    """
    ids = tokenizer.encode_batch(texts, allowed_special="all")
    stream = np.fromiter((t for row in ids for t in (*row, EOT_ID)), dtype=np.int64)
    keep, compact = np.unique(stream, return_inverse=True)
    config = PretrainConfig(**RECIPE["dapt"]["train"], steps=steps, warmup_steps=steps // 20, seed=seed)
    stage = Stage.declare(
        "dapt",
        inputs={"corpus": sha256_bytes(stream.tobytes())},
        config=config,
        code=(__name__, "model.pretrain", "model.training"),
        out_dir=out,
    )
    stage.plan(resume=False)
    windows = TokenWindows(compact.astype(np.uint16), config.context_length, config.batch_size, "random", seed)
    torch.manual_seed(seed)
    model = GPTModel(SHAPE.model_copy(update={"vocab_size": len(keep)}))
    t0 = time.perf_counter()

    def report(m: dict) -> None:
        print(
            f"  pretrain step {m['step']}/{steps} ({time.perf_counter() - t0:.0f} s): loss {m['loss']:.3f}", flush=True
        )

    state = train(
        model,
        config,
        stage=stage,
        total_steps=steps,
        batch=windows.batch,
        on_log=report,
        loss=lambda b: (lm_loss(model.features(b[0]), model.out_head.weight, b[1]), {"tokens": b[0].numel()}),
    )
    torch.manual_seed(seed)
    full = GPTModel(SHAPE)
    weights = model.state_dict()
    emb = full.tok_emb.weight.detach().clone()
    emb[torch.from_numpy(keep)] = weights["tok_emb.weight"]
    full.load_state_dict({**weights, "tok_emb.weight": emb, "out_head.weight": emb})  # the head is tied
    save_model(stage.dir / "model.pt", full)
    return {
        "corpus_tokens": len(stream),
        "vocab_used": len(keep),
        "steps": steps,
        "tokens_seen": state.tokens_seen,
        "final_loss": round(state.history[-1]["loss"], 3),
        "seconds": time.perf_counter() - t0,
    }


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


def print_validation(record: dict) -> None:
    """The fine-tuning's validation accuracy after each evaluation (the loop also logs training records)."""
    if record["kind"] == "eval":
        print(f"  epoch {record['epoch']:.2f}: val acc {record['val_accuracy']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    seeds = lambda v: [int(x) for x in v.split(",")]  # noqa: E731
    parser.add_argument("--dapt-steps", type=int, default=DAPT_STEPS, help="domain-adaptive pretraining steps")
    parser.add_argument(
        "--dapt-seeds",
        type=seeds,
        default=list(DAPT_SEEDS),
        help="domain-adaptive pretraining seeds, comma-separated: one DAPT checkpoint each",
    )
    parser.add_argument(
        "--seeds",
        type=seeds,
        default=[FINETUNE.seed],
        help="fine-tuning seeds, comma-separated, run from every DAPT checkpoint",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    settings = get_settings()
    data_dir = prepare_spam(fetch_source("sms-spam")).out_dir
    tok = get_tokenizer()
    work = work_dir(settings.home)
    work.mkdir(parents=True, exist_ok=True)
    labels = load_labels(data_dir)
    names = [name for name, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    val, test = (
        encode_split(read_split(data_dir / f"{split}.csv", labels), tok, SHAPE.context_length)
        for split in ("validation", "test")
    )

    texts = pd.concat(
        [pd.read_csv(data_dir / name, keep_default_na=False)["text"] for name in ("train.csv", "unused.csv")]
    )
    assert not (set(val.texts) | set(test.texts)) & set(texts), "validation/test texts must never reach pretraining"
    data_s = time.perf_counter() - t_start

    members, dapt_s, finetune_s = [], [], []
    for dapt_seed in args.dapt_seeds:
        print(
            f"1. domain-adaptive pretraining on {len(texts)} texts (train + unused), {args.dapt_steps} steps, "
            f"seed {dapt_seed}"
        )
        dapt = work / f"dapt-seed{dapt_seed}"
        pre = pretrain_domain(texts.tolist(), tok, args.dapt_steps, dapt, seed=dapt_seed)
        dapt_s.append(pre["seconds"])
        print(f"  {pre}")
        for seed in args.seeds:
            config = FINETUNE.model_copy(update={"init": f"checkpoint:{dapt}", "threads": args.threads, "seed": seed})
            print(f"2. fine-tuning, DAPT seed {dapt_seed}, seed {seed}: {config}")
            t = time.perf_counter()
            out = classifier_dir(settings.home, dapt_seed, seed)
            tuned = finetune(
                data_dir,
                out,
                config,
                tokenizer=tok,
                resume=False,
                on_log=print_validation,
            )
            classifier = load_classifier(tuned.best).model
            val_logits, test_logits = predict_logits(classifier, val.ids), predict_logits(classifier, test.ids)
            finetune_s.append(time.perf_counter() - t)
            members.append(
                {
                    "name": f"DAPT seed {dapt_seed}, fine-tuning seed {seed}",
                    "val": classification_report(val.labels, val_logits, names),
                    "test": classification_report(test.labels, test_logits, names),
                    "probs": torch.from_numpy(test_logits).softmax(1).numpy(),
                }
            )
    total_s = time.perf_counter() - t_start
    single_s = data_s + np.mean(dapt_s) + np.mean(finetune_s)  # what one classifier costs

    tfidf_acc, tfidf_s = tfidf_baseline(data_dir)
    n = len(test)
    ensemble = classification_report(test.labels, np.mean([m["probs"] for m in members], axis=0), names)
    print()
    print(
        f"{SHAPE.n_layers}x{SHAPE.emb_dim} GPT from random init, DAPT {args.dapt_steps} steps + fine-tune "
        f"({FINETUNE.pooling} pooling, final weights); DAPT {np.mean(dapt_s):.0f} s, fine-tune and eval "
        f"{np.mean(finetune_s):.0f} s each"
    )
    print()
    print(f"| model (spam test split, n={n}) | val acc | test accuracy | errors | ROC-AUC | wall time |")
    print("|---|---|---|---|---|---|")
    for m in members:
        test_m = m["test"]
        print(
            f"| ours, {m['name']} | {100 * m['val']['accuracy']:.2f}% | {100 * test_m['accuracy']:.2f}% | "
            f"{round(n * (1 - test_m['accuracy']))} | {test_m['roc_auc']:.4f} | {single_s:.0f} s |"
        )
    if len(members) > 1:
        print(
            f"| **ours, ensemble of the {len(members)} above** (mean probability) | | "
            f"**{100 * ensemble['accuracy']:.2f}%** | {round(n * (1 - ensemble['accuracy']))} | "
            f"{ensemble['roc_auc']:.4f} | {total_s:.0f} s |"
        )
    print(
        f"| TF-IDF + logistic regression | | {100 * tfidf_acc:.2f}% | {round(n * (1 - tfidf_acc))} | | "
        f"{tfidf_s:.1f} s |"
    )
    accs = np.array([m["test"]["accuracy"] for m in members])
    print(
        f"ours, {len(members)} classifiers: mean {100 * accs.mean():.2f}%, range {100 * accs.min():.2f}-"
        f"{100 * accs.max():.2f}%; TF-IDF {100 * tfidf_acc:.2f}%"
    )
    print(
        "confusion matrices (test, rows true ham/spam): "
        + "; ".join(f"{m['name']} {m['test']['confusion_matrix']['matrix']}" for m in members)
    )
    verdict = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    print(
        f"target, one classifier: mean test accuracy {100 * accs.mean():.2f}% >= 98% in < 900 s on "
        f"{args.threads} threads ({single_s:.0f} s): {verdict(accs.mean() >= 0.98 and single_s < 900)}"
    )
    if len(members) > 1:
        print(
            f"target, the ensemble: test accuracy {100 * ensemble['accuracy']:.2f}% >= 98% in < 900 s "
            f"({total_s:.0f} s for all of it): {verdict(ensemble['accuracy'] >= 0.98 and total_s < 900)}"
        )


if __name__ == "__main__":
    main()
