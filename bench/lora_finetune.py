"""LoRA against full and last-block fine-tuning of the spam classifier, in one run: what each costs at gpt2-small's
and SmolLM2-135M's shapes, and the spam test accuracy each reaches from one base.

    GPTFLOW_MIRROR=../shared/mirror .venv/bin/python -m bench.lora_finetune [--out DIR] [--quick] \
        [--shapes gpt2-small,smollm2-135m] [--init gpt2:gpt2-small] [--lr lora=1e-3,3e-3]

Cost: for each shape a random-weight base (speed and memory do not depend on the weights' values) is saved once as
`model.pt`; each method then fine-tunes from it through the product's own path (`finetune` with
`init: checkpoint:<model.pt>`, 1 epoch over (warm-up + timed) x batch real spam training texts, dynamic padding as
the classifier pads) in a process of its own, so that its peak resident set is its own: the peak over the whole
process (loading included) and over training alone (from the training loop's start record, VmHWM reset there).
Seconds per step: the median of the timed steps, the warm-up steps left out; every method sees the same batches.

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
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METHODS: dict[str, dict[str, Any]] = {
    "full": {"trainable": "all"},
    "last-block": {"trainable": "last_k", "last_k": 1},
    "lora-r8": {"trainable": "lora", "lora_rank": 8, "lora_alpha": 16.0},
    "lora-r16": {"trainable": "lora", "lora_rank": 16, "lora_alpha": 16.0},
    "lora-r16-all": {"trainable": "lora", "lora_rank": 16, "lora_alpha": 16.0, "lora_targets": ("all",)},
}
LABELS = {
    "full": "full fine-tuning",
    "last-block": "last block + final norm + head",
    "lora-r8": "LoRA r8 (query, value)",
    "lora-r16": "LoRA r16 (query, value)",
    "lora-r16-all": "LoRA r16 (all linear layers)",
}
COST_METHODS = ("full", "last-block", "lora-r8", "lora-r16", "lora-r16-all")
QUICK_COST_METHODS = ("full", "last-block", "lora-r8", "lora-r16-all")  # a process each: about 5 s of start-up
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


def shape_config(name: str):
    """The GPTConfig of a shape: a preset, or the quick run's tiny Llama (`smollm2-tiny`)."""
    from model.config import GPTConfig

    if name == "smollm2-tiny":
        tiny = dict(context_length=128, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96)
        return GPTConfig.from_preset("smollm2-135m", **tiny)
    return GPTConfig.from_preset(name)


class FoldedIds:
    """GPT-2's BPE with its ids folded into a smaller vocabulary (`vocab_size`), for a shape whose real tokenizer is
    not at hand: the same interface (`gptflow.tokenizer.GPT2Text`), every id below `vocab_size`, 0 the end token
    (SmolLM2's <|endoftext|>)."""

    bos_id, eos_id, pad_id, eos_ids = None, 0, 0, [0]
    files, chat_template, generation_config = None, None, {}

    def __init__(self, gpt2, vocab_size: int) -> None:
        self.gpt2, self.vocab_size = gpt2, vocab_size

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return [i % self.vocab_size for i in self.gpt2.encode(text)]

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [[i % self.vocab_size for i in row] for row in self.gpt2.encode_batch(texts)]


def text_tokenizer(vocab_size: int):
    """GPT-2's BPE for a model of its vocabulary, else `FoldedIds` over it."""
    from gptflow.tokenizer import GPT2Text, get_tokenizer

    gpt2 = GPT2Text(get_tokenizer())
    return gpt2 if vocab_size >= gpt2.vocab_size else FoldedIds(gpt2, vocab_size)


# --- memory ----------------------------------------------------------------------------------------------


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmHWM: the peak resident set since start or the last reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_kib() -> int:
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS


def reset_peak() -> bool:
    """Restart VmHWM from the current resident set (Linux: clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_kib("VmHWM") is not None
    except OSError:
        return False


# --- the cost of a step, one method per process ------------------------------------------------------------


def cost_child(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune `job["method"]` from `job["base"]` on `job["data"]` in this process; step times and peaks."""
    from model.configs import ClassifierConfig
    from model.finetune_classifier import finetune

    rss_imports = status_kib("VmRSS")
    marks: dict[str, Any] = {"times": []}

    def on_log(record: dict[str, Any]) -> None:
        if record["kind"] == "start":  # the model is loaded and on its device, the optimizer built
            marks["setup_peak_kib"], marks["rss_start_kib"] = peak_kib(), status_kib("VmRSS")
            marks["reset"] = reset_peak()
            marks["times"].append(time.perf_counter())
        elif record["kind"] == "train":
            marks["times"].append(time.perf_counter())
            marks.setdefault("tokens", []).append(record["tokens_seen"])

    config = ClassifierConfig(
        init=f"checkpoint:{job['base']}",
        **METHODS[job["method"]],
        epochs=1,
        batch_size=job["batch"],
        lr=1e-4,
        keep="last",
        log_every=1,
        checkpoint_every=10**6,
        seed=123,
        threads=job.get("threads"),
        precision=job.get("precision", "auto"),
    )
    tokenizer = text_tokenizer(job["vocab_size"])
    result = finetune(job["data"], job["run_dir"], config, tokenizer=tokenizer, on_log=on_log)
    end_peak = peak_kib()
    steps = [b - a for a, b in zip(marks["times"], marks["times"][1:])]
    timed = steps[job["warmup"] :]
    tokens = [b - a for a, b in zip([0, *marks["tokens"]], marks["tokens"])]
    return {
        "method": job["method"],
        "trainable_params": result.summary["trainable_params"],
        "steps": result.summary["steps"],
        "step_s": steps,
        "s_per_step": statistics.median(timed),
        "tokens_per_step": tokens,
        "device": result.summary["device"],
        "precision": result.summary["precision"],
        "rss_after_imports_gib": rss_imports / 2**20 if rss_imports else None,
        "rss_at_start_gib": marks["rss_start_kib"] / 2**20 if marks.get("rss_start_kib") else None,
        "peak_gib": max(marks["setup_peak_kib"], end_peak) / 2**20,
        "training_peak_gib": end_peak / 2**20 if marks.get("reset") else None,
    }


def write_cost_data(spam: Path, folder: Path, n_train: int, n_eval: int) -> Path:
    """The first `n_train` spam training texts as a data folder (one epoch = the measured steps), with
    `n_eval` validation and test texts (the end-of-training evaluation stays cheap)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        pd.read_csv(spam / f"{split}.csv", keep_default_na=False).head(n).to_csv(folder / f"{split}.csv", index=False)
    shutil.copy(spam / "labels.json", folder / "labels.json")
    return folder


def random_base(name: str, folder: Path) -> Path:
    """A random-weight model of shape `name` as `model.pt` (written once, seed 0)."""
    import torch

    from model.checkpoint import save_model
    from model.gpt import GPTModel

    path = folder / name / "model.pt"
    if not path.is_file():
        torch.manual_seed(0)
        save_model(path, GPTModel(shape_config(name)))
    return path


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """`cost_child(job)` in a fresh process (its peak resident set is the method's alone)."""
    shutil.rmtree(job["run_dir"], ignore_errors=True)  # a finished stage folder would be reused, not timed
    t0, load = time.perf_counter(), os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, "-m", "bench.lora_finetune", "--child", json.dumps(job)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    if done.returncode:
        sys.exit(f"{job['shape']} {job['method']}: the measuring process failed with exit status {done.returncode}")
    shutil.rmtree(job["run_dir"], ignore_errors=True)  # gpt2-small's full fine-tune leaves 2 GB of checkpoints
    got = json.loads(done.stdout.strip().splitlines()[-1])
    got["wall_s"], got["load_average"] = time.perf_counter() - t0, (load, os.getloadavg()[0])
    print(
        f"  {job['shape']} {job['method']}: {got['trainable_params']:,} trainable, {got['s_per_step']:.3f} s/step, "
        f"peak {got['peak_gib']:.2f} GiB ({got['wall_s']:.0f} s; load average {load:.2f} -> {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    return got


def measure_cost(args, spam: Path, out: Path) -> dict[str, Any]:
    data = write_cost_data(spam, out / "cost-data", (args.warmup + args.steps) * args.batch, args.batch)
    shapes: dict[str, Any] = {}
    jobs = []
    for name in args.shapes:
        cfg = shape_config(name)
        base = random_base(name, out / "bases")
        shapes[name] = {"config": cfg.to_dict(), "params": cfg.n_params(), "methods": {}}
        print(f"{name}: {cfg.n_layers} layers x {cfg.emb_dim}, vocab {cfg.vocab_size}, {cfg.n_params() / 1e6:.1f}M")
        for method in args.cost_methods:
            jobs.append(
                {
                    "shape": name,
                    "method": method,
                    "base": str(base),
                    "data": str(data),
                    "run_dir": str(out / "cost" / name / method),
                    "batch": args.batch,
                    "warmup": args.warmup,
                    "vocab_size": cfg.vocab_size,
                    "threads": args.threads or (1 if args.quick else None),  # quick: two at once
                    "precision": args.precision,
                }
            )
    # One process at a time, every method once per round, the round of the lower median kept (other work on the
    # cores slows whole steps down); a smoke run (--quick), whose times mean nothing, runs two at once.
    kept: dict[tuple[str, str], dict[str, Any]] = {}
    with ThreadPoolExecutor(2 if args.quick else 1) as pool:
        for _ in range(args.rounds):
            for job, got in zip(jobs, pool.map(run_child, jobs)):
                key = (job["shape"], job["method"])
                rounds = [*kept.get(key, {}).get("rounds_s_per_step", []), got["s_per_step"]]
                if key not in kept or got["s_per_step"] < kept[key]["s_per_step"]:
                    kept[key] = got
                kept[key]["rounds_s_per_step"] = rounds
    for (shape, method), got in kept.items():
        shapes[shape]["methods"][method] = got
    precisions = sorted({got["precision"] for got in kept.values()})
    if len(precisions) > 1:  # auto is decided by a measurement in each process: a tie can go either way
        print(f"WARNING: the processes trained in different precisions {precisions}: pass --precision")
    return {
        "precisions": precisions,
        "batch": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "shapes": shapes,
    }


def cost_table(cost: dict[str, Any]) -> str:
    rows = [
        "| shape | method | trainable params | vs full | s/step | vs full | peak RSS | training peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in cost["shapes"].items():
        methods = shape["methods"]
        full = methods.get("full")
        for method, got in methods.items():
            params, step = got["trainable_params"], got["s_per_step"]
            vs_params = f"{100 * params / full['trainable_params']:.2f}%" if full else ""
            vs_step = f"{step / full['s_per_step']:.2f}x" if full else ""
            training = f"{got['training_peak_gib']:.2f} GiB" if got["training_peak_gib"] is not None else "n/a"
            rows.append(
                f"| {name} | {LABELS[method]} | {params:,} | {vs_params} | {step:.3f} | {vs_step} | "
                f"{got['peak_gib']:.2f} GiB | {training} |"
            )
    return "\n".join(rows)


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
    rows = [
        "| method | trainable params | lr | validation acc | test acc | test errors | fine-tuning time |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, got in accuracy["methods"].items():
        test = got["test"]
        errors = round(test["n"] * (1 - test["accuracy"]))
        rows.append(
            f"| {LABELS[method]} | {got['trainable_params']:,} | {got['lr']:g} | {100 * got['val_accuracy']:.2f}% | "
            f"{100 * test['accuracy']:.2f}% | {errors} of {test['n']} | {got['seconds']:.0f} s |"
        )
    return "\n".join(rows)


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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(cost_child(json.loads(args.child))))
        return
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
