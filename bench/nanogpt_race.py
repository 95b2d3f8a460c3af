"""Race to a validation loss: gptflow's pretraining against nanoGPT's `train.py`, run as published.

    git clone https://github.com/karpathy/nanoGPT ../nanoGPT
    GPTFLOW_MIRROR=../shared/mirror .venv/bin/python -m bench.nanogpt_race --nanogpt ../nanoGPT \
        [--target 5.15] [--ours muon:150] [--ours adamw:300] [--nanogpt-steps 300] [--every 10] [--threads 2]

Both trainers read the same token files: tiny Shakespeare's `train.bin` and `val.bin` from our corpus stage
(GPT-2 BPE, uint16, the layout nanoGPT's `prepare.py` writes). Same shape (4 layers, 4 heads, 256 wide,
context 256, tied embeddings, biases, no dropout), batch 8, peak lr 2e-3 with 50 warmup steps and a cosine to
10%, weight decay 0.1, betas (0.9, 0.95), clipping at 1.0, fp32, `--threads` threads each, one after the other.
nanoGPT runs from its checkout folder with command-line overrides only (its defaults target a GPU).
What differs is each trainer's own: nanoGPT pads its vocabulary to 50304, uses the exact GELU and foreach AdamW
on CPUs; ours uses the tanh GELU, the fused LM head and loss, fused AdamW, and Muon with `--ours muon:N`.

Both write their checkpoint every `--every` steps. A watcher copies each one when its write is complete and
stamps it with the file's modification time since the trainer's process started (imports included).
Afterwards one evaluator scores every copy: the mean next-token cross-entropy over all non-overlapping
256-token windows of `val.bin`, computed from each model's own logits. The table gives each trainer's time to
`--target`, its final loss and its wall time. `--quick` is a smoke run of a few steps.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.data_parallel import cpu_model
from bench.train_throughput import table

CONTEXT, EMB, LAYERS, HEADS, BATCH = 256, 256, 4, 4, 8
LR, WARMUP, MIN_LR_RATIO, WEIGHT_DECAY = 2e-3, 50, 0.1, 0.1


@dataclass
class Racer:
    """One trainer: the command that runs it, the checkpoint it rewrites, and how to read a model from it."""

    name: str
    steps: int
    command: list[str]
    cwd: Path
    checkpoint: Path
    load: Callable[[Path], tuple[int, Callable[[torch.Tensor], torch.Tensor]]]  # -> (step, logits of inputs)
    points: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds, val loss)
    wall_s: float = 0.0


def nanogpt_racer(checkout: Path, data_dir: Path, out_dir: Path, steps: int, every: int) -> Racer:
    """nanoGPT's train.py with only `--key=value` overrides: our shape and hyper-parameters, CPU, fp32."""
    overrides = dict(
        out_dir=out_dir, dataset=data_dir, init_from="scratch", always_save_checkpoint=True, wandb_log=False,
        eval_interval=every, eval_iters=1, log_interval=every, max_iters=steps, lr_decay_iters=steps,
        warmup_iters=WARMUP, learning_rate=LR, min_lr=LR * MIN_LR_RATIO, weight_decay=WEIGHT_DECAY, beta1=0.9,
        beta2=0.95, grad_clip=1.0, batch_size=BATCH, gradient_accumulation_steps=1, block_size=CONTEXT,
        n_layer=LAYERS, n_head=HEADS, n_embd=EMB, dropout=0.0, bias=True, device="cpu", dtype="float32",
        compile=False,
    )  # fmt: skip
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")  # not our `model`
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def load(path: Path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
            net = module.GPT(module.GPTConfig(**ckpt["model_args"]))
        net.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
        return ckpt["iter_num"], lambda x: net.eval()(x, x)[0]  # with targets it returns every position's logits

    command = [sys.executable, "train.py", *(f"--{k}={v}" for k, v in overrides.items())]
    return Racer(f"nanoGPT, AdamW, {steps} steps", steps, command, checkout, out_dir / "ckpt.pt", load)


def ours_racer(optimizer: str, steps: int, data_dir: Path, out_dir: Path, every: int, threads: int) -> Racer:
    """`model.pretrain.pretrain`, the pretraining stage's own function, in its own process."""
    config = dict(
        preset="mini", optimizer=optimizer, steps=steps, batch_size=BATCH, lr=LR, warmup_steps=WARMUP,
        min_lr_ratio=MIN_LR_RATIO, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.95), grad_clip=1.0, dropout=0.0,
        precision="fp32", threads=threads, eval_every=every, eval_batches=1, checkpoint_every=every,
        log_every=every, sample_tokens=0,
    )  # fmt: skip
    code = (
        "import sys; from model.pretrain import PretrainConfig, pretrain; "
        f"pretrain(sys.argv[1], sys.argv[2], PretrainConfig(**{config!r}), progress=False)"
    )

    def load(path: Path):
        from model.checkpoint import load_checkpoint, model_from_state

        state = load_checkpoint(path)
        net, _ = model_from_state(state, path)
        return state["train_state"]["step"], net.eval()

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", code, str(data_dir), str(out_dir)]
    return Racer(f"gptflow, {optimizer}, {steps} steps", steps, command, root, out_dir / "last.pt", load)


def watch(
    path: Path, into: Path, started: float, done: threading.Event, settle_s: float = 1.0
) -> list[tuple[Path, float]]:
    """Copy `path` each time a write of it completes; each copy with its write time, in seconds since `started`.
    nanoGPT rewrites its file in place, so a copy counts only if the file was unchanged for `settle_s` and while it
    was copied, and the copy is a whole zip archive; ours replaces its file atomically."""
    copies: list[tuple[Path, float]] = []
    seen = None
    while True:
        finished = done.is_set()  # read before looking, so the final write is caught
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        stamp = stat and (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp and stamp != seen and (finished or time.time() - stat.st_mtime >= settle_s):
            copy = into / f"{len(copies):04d}.pt"
            shutil.copyfile(path, copy)
            after = path.stat()
            # torch.save writes a zip whose directory comes last: without it the write had only paused
            if (after.st_ino, after.st_mtime_ns, after.st_size) == stamp and zipfile.is_zipfile(copy):
                copies.append((copy, stat.st_mtime - started))
                seen = stamp
        if finished:
            return copies
        time.sleep(settle_s / 5)


def val_windows(tokens: np.ndarray, context: int = CONTEXT, limit: int | None = None) -> torch.Tensor:
    """The non-overlapping windows of `context` + 1 tokens (inputs and their next tokens), in order."""
    tokens = tokens.astype(np.int64)
    n = (len(tokens) - 1) // context
    return torch.from_numpy(np.stack([tokens[i * context : (i + 1) * context + 1] for i in range(n)])[:limit])


@torch.no_grad()
def val_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> float:
    """The one evaluator: mean cross-entropy of every next token of `windows`, in fp32."""
    total, count = 0.0, 0
    for rows in windows.split(BATCH):
        logits = logits_of(rows[:, :-1].contiguous()).float()
        total += F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    return total / count


def race(racer: Racer, windows: torch.Tensor, threads: int, work: Path) -> None:
    """Train, copying checkpoints as they appear; then score the copies (no scoring while a trainer runs)."""
    copies_dir = work / "copies"
    copies_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"\n== {racer.name}: {' '.join(racer.command[:2])} ... (cwd {racer.cwd})", flush=True)
    done = threading.Event()
    started = time.time()
    log = (work / "train.log").open("w")
    process = subprocess.Popen(racer.command, cwd=racer.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    found: list[tuple[Path, float]] = []
    watcher = threading.Thread(target=lambda: found.extend(watch(racer.checkpoint, copies_dir, started, done)))
    watcher.start()
    code = process.wait()
    racer.wall_s = time.time() - started
    done.set()
    watcher.join()
    log.close()
    if code:
        tail = (work / "train.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{racer.name} exited with {code}:\n" + "\n".join(tail))
    for copy, seconds in found:
        try:
            step, logits_of = racer.load(copy)
        except Exception as exc:  # noqa: BLE001 - a copy that does not load is left out, and said so
            print(f"  {seconds:7.1f} s: copy does not load ({type(exc).__name__}: {exc}); left out", flush=True)
            continue
        loss = val_loss(logits_of, windows)
        racer.points.append((step, seconds, loss))
        print(f"  step {step:4d}  {seconds:7.1f} s  val loss {loss:.4f}", flush=True)
        copy.unlink()
    shutil.rmtree(copies_dir)


def time_to(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first point at or below `target`."""
    return next(((step, s) for step, s, loss in points if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout (train.py, model.py)")
    parser.add_argument("--target", type=float, default=5.15, help="validation loss to reach")
    parser.add_argument("--ours", action="append", help="OPTIMIZER:STEPS (repeatable; default muon:150)")
    parser.add_argument("--nanogpt-steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="checkpoint (and in-loop evaluation) interval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps each, 16 validation windows")
    args = parser.parse_args()
    checkout = args.nanogpt.resolve()
    if not (checkout / "train.py").is_file() or not (checkout / "model.py").is_file():
        raise SystemExit(f"--nanogpt {args.nanogpt}: no train.py and model.py there (a nanoGPT checkout)")
    ours = [spec.split(":") for spec in args.ours or ["muon:150"]]
    if any(len(spec) != 2 or spec[0] not in ("adamw", "muon") or not spec[1].isdigit() for spec in ours):
        raise SystemExit(f"--ours {args.ours}: expected OPTIMIZER:STEPS with OPTIMIZER adamw or muon")
    steps_of = (lambda n: min(n, 20)) if args.quick else (lambda n: n)

    from data.corpus import prepare_corpus

    data_dir = prepare_corpus("tinyshakespeare").out_dir.resolve()
    windows = val_windows(np.fromfile(data_dir / "val.bin", dtype=np.uint16), limit=16 if args.quick else None)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; corpus {data_dir}")
    print(f"evaluator: {len(windows)} windows x {CONTEXT} tokens of val.bin; target {args.target}")
    with tempfile.TemporaryDirectory(prefix="nanogpt-race-") as tmp:
        racers = [
            ours_racer(opt, steps_of(int(n)), data_dir, Path(tmp, f"ours-{opt}", "run"), args.every, args.threads)
            for opt, n in ours
        ]
        racers.append(
            nanogpt_racer(checkout, data_dir, Path(tmp, "nanogpt", "run"), steps_of(args.nanogpt_steps), args.every)
        )
        for racer in racers:
            race(racer, windows, args.threads, racer.checkpoint.parent.parent)
    rows = []
    for racer in racers:
        reached = time_to(racer.points, args.target)
        step, seconds, loss = racer.points[-1] if racer.points else (0, math.nan, math.nan)
        rows.append(
            {
                "trainer": racer.name,
                f"time to {args.target}": f"{reached[1]:.0f} s (step {reached[0]})" if reached else "not reached",
                "final val loss": f"{loss:.3f} (step {step})",
                "wall": f"{racer.wall_s:.0f} s",
            }
        )
    table(rows, f"Time to validation loss {args.target} (one evaluator, {len(windows)} windows of val.bin):")
    base = time_to(racers[-1].points, args.target)
    for racer in racers[:-1]:
        reached = time_to(racer.points, args.target)
        if reached and base:
            print(f"{racer.name}: {base[1] / reached[1]:.2f}x faster than nanoGPT to {args.target}")


if __name__ == "__main__":
    main()
