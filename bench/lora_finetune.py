"""LoRA against full and last-block fine-tuning of the spam classifier, in one run: what each costs at gpt2-small's
and SmolLM2-135M's shapes, and the spam test accuracy each reaches from one base.

    GPTFLOW_MIRROR=../shared/mirror .venv/bin/python -m bench.lora_finetune [--out DIR] [--quick] \
        [--shapes gpt2-small,smollm2-135m] [--init gpt2:gpt2-small] [--lr lora=1e-3,3e-3]

Cost (`bench.lora_cost`): for each shape a random-weight base, and each method fine-tuned from it through the
product's own path in a process of its own: trainable parameters, seconds per step, peak resident memory.

Accuracy: one base made in the same run, by default a small GPT domain-pretrained on the spam training texts
(`pretrain_domain`, as `configs/spam-best.yaml` does, shorter) since no GPT-2 weights can be fetched here; `--init`
names any other base (`gpt2:gpt2-small`: the book's setting). Each method (the four above and LoRA r16 on every
linear layer, the book's appendix E) fine-tunes from it with the same data, schedule and seed and keeps its final
weights; accuracy is read from `best.pt` through the classifier reader (a LoRA checkpoint merged onto its base). Each
method trains with each of its learning rates (`LRS`; `--lr` replaces them) and keeps the one of best validation
accuracy (ties: lower validation loss); the test split is read for the kept one only.

SmolLM2's shape keeps its 49152-token vocabulary: its texts are GPT-2 BPE ids folded into that range (the cost of a
step does not depend on which ids). Precision `auto` is decided by a measurement in each process (bf16 autocast on a
CPU where it is faster); the tables name it. Writes `<out>/lora_finetune.json`; the cores may be shared: times are
noisy, hence the rounds and the load averages printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.lora_cost import (
    COST_METHODS,
    LABELS,
    METHODS,
    QUICK_COST_METHODS,
    cost_table,
    measure_cost,
    write_cost_data,
)
from gptflow.markdown import markdown_table

ACCURACY_METHODS = ("full", "last-block", "lora-r8", "lora-r16", "lora-r16-all")
# The learning rates each method tries ("lora": every LoRA method), the one of best validation accuracy kept. A
# first run over 1e-4..1e-3 (full), 3e-4..3e-3 (last block), 1e-3..1e-2 (LoRA) kept the lowest of each: hence these.
LRS = {"full": (3e-5, 1e-4, 3e-4), "last-block": (1e-4, 3e-4, 1e-3), "lora": (3e-4, 1e-3, 3e-3)}
# The accuracy run's base: a small GPT domain-pretrained on the spam training texts (spam-best.yaml's recipe at
# 4x192 and half its steps), and the fine-tuning schedule of that recipe.
BASE_SHAPE = {"context_length": 128, "emb_dim": 192, "n_layers": 4, "n_heads": 4}
DAPT = {"steps": 400, "window": 64, "batch_size": 32, "lr": 2e-3, "warmup_steps": 40, "min_lr_ratio": 0.05}
FINETUNE = {"epochs": 5, "batch_size": 16, "dropout": 0.1, "warmup_steps": 50, "min_lr_ratio": 0.1, "keep": "last"}
QUICK_DAPT = {"steps": 4, "window": 32, "batch_size": 4, "lr": 2e-3, "warmup_steps": 1, "min_lr_ratio": 0.05}
QUICK_FINETUNE = {**FINETUNE, "epochs": 1, "batch_size": 8, "warmup_steps": 1}


# --- accuracy from one base --------------------------------------------------------------------------------


def make_base(args, spam: Path, out: Path) -> tuple[str, dict[str, Any]]:
    """The init spec every accuracy fine-tune starts from: `--init`, else a DAPT'd small GPT made here."""
    if args.init != "dapt":
        return args.init, {"init": args.init}
    from model.config import GPTConfig
    from model.configs import ClassifierConfig, DaptConfig
    from model.finetune_classifier import pretrain_domain

    dapt = QUICK_DAPT if args.quick else DAPT
    shape = GPTConfig(**(dict(BASE_SHAPE, emb_dim=64, n_layers=2) if args.quick else BASE_SHAPE))
    run = {"seed": args.seed, "threads": args.threads, "precision": args.precision}
    config = ClassifierConfig(shape=shape, dapt=DaptConfig(**dapt), **run)
    folder = out / "accuracy" / "dapt"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    result = pretrain_domain(spam, folder, config)
    seconds = time.perf_counter() - t0
    print(f"base: DAPT {shape.n_layers}x{shape.emb_dim}, {dapt['steps']} steps, {seconds:.0f} s", flush=True)
    info = {"init": "dapt", "shape": shape.to_dict(), "dapt": dapt, "seconds": seconds, "metrics": result.metrics}
    return f"checkpoint:{result.model_path}", info


def split_accuracy(best: Path, data_dir: Path, split: str) -> dict[str, float]:
    """Accuracy and loss of the classifier `best` on a split, read as every consumer reads it (LoRA merged)."""
    from gptflow.splits import read_labelled, read_labels
    from model.checkpoint import load_checkpoint
    from model.classifier import classifier_from_state, encode_split, evaluate_split

    loaded = classifier_from_state(load_checkpoint(best), best)
    tokenizer = loaded.tokenizer()  # the base's own, else GPT-2's BPE
    df = read_labelled(data_dir / f"{split}.csv", read_labels(data_dir))
    metrics = evaluate_split(loaded.model, encode_split(df, tokenizer, loaded.max_length), 64)
    return {"accuracy": metrics["val_accuracy"], "loss": metrics["val_loss"], "n": len(df)}


def lrs_for(method: str, lrs: dict[str, tuple[float, ...]]) -> tuple[float, ...]:
    return lrs.get(method) or lrs["lora" if method.startswith("lora") else method]


def measure_accuracy(args, spam: Path, out: Path) -> dict[str, Any]:
    from model.configs import ClassifierConfig
    from model.finetune_classifier import finetune

    data = spam
    if args.quick:  # a few texts of each split: the whole path, in seconds
        data = write_cost_data(spam, out / "accuracy-data", 48, 16)
    init, base = make_base(args, data, out)
    schedule = QUICK_FINETUNE if args.quick else FINETUNE
    methods: dict[str, Any] = {}
    precisions: set[str] = set()
    for method in args.accuracy_methods:
        tries = []
        for lr in lrs_for(method, args.lrs):
            run_dir = out / "accuracy" / f"{method}-lr{lr:g}"
            shutil.rmtree(run_dir, ignore_errors=True)
            config = ClassifierConfig(
                init=init,
                **METHODS[method],
                **schedule,
                lr=lr,
                seed=args.seed,
                threads=args.threads,
                precision=args.precision,
            )
            t0 = time.perf_counter()
            result = finetune(data, run_dir, config)  # texts read with the base's own tokenizer
            seconds = time.perf_counter() - t0
            val = result.summary["best_val_accuracy"], result.summary["best_val_loss"]
            precisions.add(result.summary["precision"])
            tries.append(
                {"lr": lr, "val_accuracy": val[0], "val_loss": val[1], "seconds": seconds, "best": result.best}
            )
            print(f"  {method} lr {lr:g}: validation {100 * val[0]:.2f}% ({seconds:.0f} s)", flush=True)
        kept = max(tries, key=lambda t: (t["val_accuracy"], -t["val_loss"]))
        test = split_accuracy(Path(kept["best"]), data, "test")
        methods[method] = {
            "trainable_params": result.summary["trainable_params"],
            "lr": kept["lr"],
            "val_accuracy": kept["val_accuracy"],
            "test": test,
            "seconds": kept["seconds"],
            "tries": [{k: v for k, v in t.items() if k != "best"} for t in tries],
        }
        print(f"{method}: lr {kept['lr']:g}, test {100 * test['accuracy']:.2f}% of {test['n']}", flush=True)
    if "metrics" in base:  # the DAPT run's
        precisions.add(base["metrics"]["precision"])
    return {"base": base, "schedule": schedule, "seed": args.seed, "precisions": sorted(precisions), "methods": methods}


def accuracy_table(accuracy: dict[str, Any]) -> str:
    rows = []
    for method, got in accuracy["methods"].items():
        test = got["test"]
        rows.append(
            {
                "method": LABELS[method],
                "trainable params": f"{got['trainable_params']:,}",
                "lr": f"{got['lr']:g}",
                "validation acc": f"{100 * got['val_accuracy']:.2f}%",
                "test acc": f"{100 * test['accuracy']:.2f}%",
                "test errors": f"{round(test['n'] * (1 - test['accuracy']))} of {test['n']}",
                "fine-tuning time": f"{got['seconds']:.0f} s",
            }
        )
    return "\n".join(markdown_table(rows))


# --- the command -----------------------------------------------------------------------------------------


def parse_lrs(values: list[str], quick: bool = False) -> dict[str, tuple[float, ...]]:
    """`METHOD=LR[,LR...]` (METHOD: full, last-block, lora, or one LoRA method) over the defaults (quick: the
    middle one of each)."""
    lrs = {method: rates[len(rates) // 2 :][:1] if quick else rates for method, rates in LRS.items()}
    for value in values:
        method, _, rates = value.partition("=")
        if method not in (*METHODS, "lora") or not rates:
            raise ValueError(
                f"--lr {value!r}: expected METHOD=LR[,LR...] with METHOD one of lora, {', '.join(METHODS)}"
            )
        lrs[method] = tuple(float(r) for r in rates.split(","))
    return lrs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="work and output folder (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up + 1 timed step (smoke run)")
    parser.add_argument("--shapes", help="comma-separated shapes of the cost part (default gpt2-small,smollm2-135m)")
    parser.add_argument("--batch", type=int, default=8, help="texts per step in the cost part")
    parser.add_argument("--warmup", type=int, help="untimed steps (default 2)")
    parser.add_argument("--steps", type=int, help="timed steps (default 6)")
    parser.add_argument("--rounds", type=int, help="processes per method, the faster kept (default 2; quick 1)")
    parser.add_argument("--init", default="dapt", help="the accuracy part's base: dapt (default) or an init spec")
    parser.add_argument("--lr", action="append", default=[], help="METHOD=LR[,LR...]: learning rates to try")
    parser.add_argument("--seed", type=int, default=123, help="seed of the accuracy part's base and fine-tunes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto (default): bf16 where faster"
    )
    parser.add_argument("--parts", default="cost,accuracy", help="cost, accuracy or both")
    args = parser.parse_args(argv)
    args.shapes = (args.shapes or ("tiny,smollm2-tiny" if args.quick else "gpt2-small,smollm2-135m")).split(",")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 6)
    args.rounds = args.rounds or (1 if args.quick else 2)
    try:
        args.lrs = parse_lrs(args.lr, args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    args.cost_methods, args.accuracy_methods = QUICK_COST_METHODS if args.quick else COST_METHODS, ACCURACY_METHODS
    parts = set(args.parts.split(","))
    out = (args.out or Path(tempfile.mkdtemp(prefix="lora-finetune-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["GPTFLOW_HOME"] = str(out / "home")  # the data stage and downloads; children inherit it

    import torch

    from bench.data_parallel import cpu_model, usable_cores
    from data.spam import prepare_spam
    from gptflow.download import fetch_source
    from gptflow.errors import GptflowError
    from gptflow.settings import get_settings

    get_settings.cache_clear()
    machine = {
        "cpu": cpu_model(),
        "usable_cores": usable_cores(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": os.getloadavg()[0],
    }
    print(f"machine: {machine['cpu']}, {machine['usable_cores']} cores, torch {machine['torch']}, {machine['date']}")
    spam = prepare_spam(fetch_source("sms-spam")).out_dir
    record: dict[str, Any] = {
        "machine": machine,
        "command": " ".join(["python -m bench.lora_finetune", *sys.argv[1:]]),
        "quick": args.quick,
    }
    t0 = time.perf_counter()
    if "cost" in parts:
        record["cost"] = measure_cost(args, spam, out)
    if "accuracy" in parts:
        try:
            record["accuracy"] = measure_accuracy(args, spam, out)
        except GptflowError as exc:  # a base that cannot be had (GPT-2 weights not mirrored): its one line
            sys.exit(f"accuracy: {exc}")
    machine["load_average_end"], record["seconds"] = os.getloadavg()[0], time.perf_counter() - t0
    if "cost" in record:
        cost = record["cost"]
        print(
            f"\nCost: batch {cost['batch']}, median of {cost['timed_steps']} steps after {cost['warmup_steps']} "
            f"warm-up, the better of {cost['rounds']} rounds; {'/'.join(cost['precisions'])}; random-weight bases\n"
        )
        print(cost_table(cost))
    if "accuracy" in record:
        base = record["accuracy"]["base"]
        name = "DAPT" if base["init"] == "dapt" else base["init"]
        print(f"\nSpam accuracy from one base ({name}); {'/'.join(record['accuracy']['precisions'])}:\n")
        print(accuracy_table(record["accuracy"]))
    path = out / "lora_finetune.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(
        f"\nload average {machine['load_average_start']:.2f} -> {machine['load_average_end']:.2f}; "
        f"{record['seconds']:.0f} s; wrote {path}"
    )


if __name__ == "__main__":
    main()
