"""Spam test accuracy with no GPT-2 weights, beside a TF-IDF + logistic-regression baseline, with wall time.

    GPTFLOW_MIRROR=../shared/mirror .venv/bin/python -m bench.classify_accuracy [--dapt-steps 800] [--seeds 123,7,99]

The recipe (deterministic for a given seed; DAPT seed 123, shared by the fine-tuning seeds):
1. Domain-adaptive pretraining (DAPT) of a 4x192 GPT from random init on the training split's texts plus the
   unused (balanced-away) messages; never a validation or test text. Random 64-token windows of the message
   stream, batch 32, AdamW lr 2e-3 with warmup + cosine, bf16 autocast, in a compact vocabulary (the tokens
   that occur in that corpus), saved back in GPT-2 token ids.
2. Fine-tune all weights as a classifier (model/classifier.py, head on the last real token), early
   stopping on validation accuracy; the best-validation checkpoint is kept. Once per fine-tuning seed: on 898
   training messages the seed alone moves test accuracy by about 2 points, so one seed would mislead.
3. Test accuracy of each checkpoint, and of the seed picked on validation (best accuracy, then lowest loss);
   TF-IDF (word 1-2 grams + char 2-5 grams) + logistic regression on the same train split, C picked on the
   validation split.
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

from gptflow.data.spam import prepare_spam
from gptflow.download import fetch_source
from gptflow.settings import get_settings
from gptflow.tokenizer import EOT_ID, get_tokenizer
from model.checkpoint import save_model
from model.classifier import ClassifierConfig, evaluate_classifier, finetune
from model.config import GPTConfig
from model.gpt import GPTModel
from model.pretrain import lm_loss
from model.training import autocast, build_optimizer, warmup_cosine

SHAPE = GPTConfig(context_length=128, emb_dim=192, n_layers=4, n_heads=4)
# x 32 windows x 64 tokens: about 15 passes over the 108k-token corpus. Mean validation accuracy over 3 fine-tuning
# seeds: 800 steps 98.18%; 500 steps 97.40%; 1600 steps memorise the corpus (LM loss 0.65 vs 3.25) 97.14%;
# 800 steps with dropout 0.1 97.14%.
DAPT_STEPS = 800
# Chosen on mean validation accuracy over fine-tuning seeds 123, 7, 99 from one DAPT checkpoint (never on test):
# last_real pooling 98.18%, mean pooling 97.14% (mean pooling with only the last 2 blocks trained: 96.09%). On top
# of last_real: lr 1e-4 x 8 epochs 97.66%, dropout 0.2 + weight decay 0.3 97.92%, lr 2e-4 97.92%. The fine-tune
# overfits after about one epoch, hence cosine decay and validation every 1/3 epoch.
FINETUNE = ClassifierConfig(trainable="all", pooling="last_real", lr=3e-4, dropout=0.1, epochs=5, batch_size=16,
                            warmup_steps=50, min_lr_ratio=0.1, eval_every=19, patience=6, seed=123, bf16=True)


def pretrain_domain(texts: list[str], tokenizer, steps: int, out: Path, *, window: int = 64, batch: int = 32,
                    lr: float = 2e-3, seed: int = 123) -> dict:
    """Next-token pretraining on `texts` (EOT between messages) in a compact vocabulary, saved in GPT-2 ids.

    The corpus uses about 1/5 of GPT-2's 50257 tokens. Training a model whose vocabulary is only those tokens
    is the same objective on this corpus (a full softmax over every token that can occur as a target) without
    the cost of embedding rows and optimizer state it would never touch. Afterwards the trained rows are
    scattered into a full-vocabulary GPTModel; tokens the corpus lacks keep their random init.
    """
    ids = tokenizer.encode_batch(texts, allowed_special="all")
    stream = np.fromiter((t for row in ids for t in (*row, EOT_ID)), dtype=np.int64)
    keep, compact = np.unique(stream, return_inverse=True)
    tokens = torch.from_numpy(compact.astype(np.int64))
    torch.manual_seed(seed)
    model = GPTModel(SHAPE.model_copy(update={"vocab_size": len(keep)}))
    opt = build_optimizer(model, lr, 0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps // 20, steps, 0.05))
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        starts = torch.randint(0, len(tokens) - window - 1, (batch,), generator=gen)
        rows = torch.stack([tokens[s:s + window + 1] for s in starts])
        with autocast(True):
            loss = lm_loss(model.features(rows[:, :-1]), model.out_head.weight, rows[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"  pretrain step {step + 1}/{steps} ({time.perf_counter() - t0:.0f} s): "
                  f"loss {np.mean(losses[-100:]):.3f}", flush=True)

    torch.manual_seed(seed)
    full = GPTModel(SHAPE)
    state = model.state_dict()
    emb = full.tok_emb.weight.detach().clone()
    emb[torch.from_numpy(keep)] = state["tok_emb.weight"]
    full.load_state_dict({**state, "tok_emb.weight": emb, "out_head.weight": emb})  # the head is tied
    save_model(out, full)
    return {"corpus_tokens": len(stream), "vocab_used": len(keep), "steps": steps,
            "tokens_seen": steps * batch * window, "final_loss": round(float(np.mean(losses[-100:])), 3),
            "seconds": time.perf_counter() - t0}


def tfidf_baseline(data_dir: Path) -> tuple[float, float]:
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    train, val, test = (pd.read_csv(data_dir / f"{s}.csv", keep_default_na=False) for s in ("train", "validation", "test"))
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    fit = lambda texts: hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()  # noqa: E731
    tf = lambda texts: hstack([word.transform(texts), char.transform(texts)]).tocsr()  # noqa: E731
    x_train = fit(train["text"])
    best = max((LogisticRegression(C=c, max_iter=2000).fit(x_train, train["label"]).score(tf(val["text"]), val["label"]), c)
               for c in (1, 3, 10, 30, 100))
    clf = LogisticRegression(C=best[1], max_iter=2000).fit(x_train, train["label"])
    return float(clf.score(tf(test["text"]), test["label"])), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dapt-steps", type=int, default=DAPT_STEPS, help="domain-adaptive pretraining steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[123, 7, 99],
                        help="fine-tuning seeds, comma-separated (one DAPT is shared): shows the seed spread")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    settings = get_settings()
    data_dir = prepare_spam(fetch_source("sms-spam")).out_dir
    tok = get_tokenizer()
    work = settings.home / "bench" / "classify_accuracy"
    work.mkdir(parents=True, exist_ok=True)

    texts = pd.concat([pd.read_csv(data_dir / name, keep_default_na=False)["text"] for name in ("train.csv", "unused.csv")])
    held_out = set(pd.read_csv(data_dir / "test.csv", keep_default_na=False)["text"]) | \
        set(pd.read_csv(data_dir / "validation.csv", keep_default_na=False)["text"])
    assert not held_out & set(texts), "validation/test texts must never reach pretraining"
    print(f"1. domain-adaptive pretraining on {len(texts)} texts (train + unused), {args.dapt_steps} steps")
    pre = pretrain_domain(texts.tolist(), tok, args.dapt_steps, work / "dapt.pt")
    print(f"  {pre}")

    t_ft = time.perf_counter()
    runs = []
    for seed in args.seeds:
        config = FINETUNE.model_copy(update={"init": f"checkpoint:{work / 'dapt.pt'}", "threads": args.threads,
                                             "seed": seed})
        print(f"2. fine-tuning, seed {seed}: {config}")
        t = time.perf_counter()
        tuned = finetune(data_dir, work / f"classifier-seed{seed}", config, tokenizer=tok, resume=False,
                         on_log=lambda m: print(f"  epoch {m['epoch']:.2f}: val acc {m['val_accuracy']:.4f}",
                                                flush=True))
        test = evaluate_classifier(tuned.best, data_dir, work / f"classifier-seed{seed}", tokenizer=tok)["test"]
        runs.append({"seed": seed, "summary": tuned.summary, "test": test, "seconds": time.perf_counter() - t})
    ft_s = time.perf_counter() - t_ft
    ours_s = (t_ft - t_start) + ft_s / len(runs)  # data + DAPT + one fine-tune: what one classifier costs

    tfidf_acc, tfidf_s = tfidf_baseline(data_dir)
    n = runs[0]["test"]["n"]
    tfidf_errors = round(n * (1 - tfidf_acc))
    print()
    print(f"| model (spam test split, n={n}) | test accuracy | errors | ROC-AUC | wall time |")
    print("|---|---|---|---|---|")
    for run in runs:
        test, summary = run["test"], run["summary"]
        print(f"| ours, seed {run['seed']}: {SHAPE.n_layers}x{SHAPE.emb_dim} GPT from random init, DAPT "
              f"{pre['steps']} steps + fine-tune ({FINETUNE.pooling} pooling, best val acc "
              f"{summary['best_val_accuracy']:.4f} at step {summary['best_step']}) | {100 * test['accuracy']:.2f}% | "
              f"{round(n * (1 - test['accuracy']))} | {test['roc_auc']:.4f} | DAPT {pre['seconds']:.0f} s + "
              f"fine-tune and eval {run['seconds']:.0f} s |")
    print(f"| TF-IDF + logistic regression | {100 * tfidf_acc:.2f}% | {tfidf_errors} | | {tfidf_s:.1f} s |")
    accs = np.array([run["test"]["accuracy"] for run in runs])
    # picked on validation, never test: best accuracy, ties broken by the lower validation loss
    chosen = max(runs, key=lambda run: (run["summary"]["best_val_accuracy"], -run["summary"]["best_val_loss"]))
    print(f"ours over {len(runs)} fine-tuning seeds: mean {100 * accs.mean():.2f}%, range {100 * accs.min():.2f}-"
          f"{100 * accs.max():.2f}%; picked by validation accuracy: seed {chosen['seed']}, "
          f"{100 * chosen['test']['accuracy']:.2f}%; TF-IDF {100 * tfidf_acc:.2f}%")
    print(f"confusion matrix of the picked seed (test, rows true ham/spam): "
          f"{chosen['test']['confusion_matrix']['matrix']}")
    met = chosen["test"]["accuracy"] >= 0.98 and ours_s < 900
    print(f"target: >= 98% in < 900 s on {args.threads} threads (one DAPT + one fine-tune: {ours_s:.0f} s): "
          f"{'MET' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
