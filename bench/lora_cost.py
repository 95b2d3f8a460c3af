"""The cost half of `bench.lora_finetune`: the methods compared, and what a step of each costs at a shape, each method
fine-tuned in a process of its own (`python -m bench.lora_cost JOB`) so that its peak resident set is its own.

Every method fine-tunes through the product's own path (`finetune` from `init: checkpoint:<model.pt>` of a
random-weight base: speed and memory do not depend on the weights' values). Seconds per step: the median of the timed
steps from the training loop's log records, the warm-up steps left out; every method sees the same batches. Peaks:
over the whole process (loading included) and over training alone (VmHWM reset at the training loop's start).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.memory import peak_kib, reset_peak, status_kib
from gptflow.markdown import markdown_table

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
        [sys.executable, "-m", "bench.lora_cost", json.dumps(job)],
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
    rows = []
    for name, shape in cost["shapes"].items():
        methods = shape["methods"]
        full = methods.get("full")
        for method, got in methods.items():
            params, step = got["trainable_params"], got["s_per_step"]
            training = got["training_peak_gib"]
            rows.append(
                {
                    "shape": name,
                    "method": LABELS[method],
                    "trainable params": f"{params:,}",
                    "vs full": f"{100 * params / full['trainable_params']:.2f}%" if full else "",
                    "s/step": f"{step:.3f}",
                    "time vs full": f"{step / full['s_per_step']:.2f}x" if full else "",
                    "peak RSS": f"{got['peak_gib']:.2f} GiB",
                    "training peak RSS": "n/a" if training is None else f"{training:.2f} GiB",
                }
            )
    return "\n".join(markdown_table(rows))


if __name__ == "__main__":
    print(json.dumps(cost_child(json.loads(sys.argv[1]))))
