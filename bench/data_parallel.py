"""Data-parallel training throughput: 1 process with gradient accumulation vs N ranks under torchrun, same
global batch, both through the product's own code path.

    .venv/bin/python -m bench.data_parallel [--steps 20] [--nproc 2] [--preset mini] [--precision fp32]

(i)  `model.pretrain.pretrain` in this process: micro-batch B/N, grad_accum N, `threads` intra-op threads.
(ii) `model.launch.launch("model.pretrain:pretrain", ...)` with `launcher: {kind: torchrun, nproc_per_node: N}`:
     N ranks (gloo on the CPU, NCCL with --device cuda) of micro-batch B/N, grad_accum 1, `threads / N` threads
     each, so both runs use the same cores.
Both read the same micro-batches (rank r of N reads micro-batch step x N + r; one process with grad_accum N
reads step x N + micro), so their per-step losses should agree up to float rounding: the table says by how much.

tokens/s is from the training loop's own records (log_every 1: each record's tokens_per_s covers one optimizer
step, evaluation excluded): global tokens of the steps after `--warmup` over the time those steps took, i.e.
sum(tokens) / sum(tokens_i / tokens_per_s_i). "wall" is the whole call (model build, torchrun start-up and
imports for (ii), the final evaluation and checkpoint), for reference only. The corpus is random uint16 tokens
in a temporary folder, and GPTFLOW_HOME points to a temporary folder too.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.train_throughput import table
from model.config import GPTConfig


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def write_corpus(folder: Path, vocab: int, train_tokens: int, val_tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", train_tokens), ("val.bin", val_tokens)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(folder / name)
    return folder


def measured(records: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """tokens/s and ms/step over the train records after `warmup` steps (one record per step)."""
    trains = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    tokens, seconds, step_ms, previous = 0.0, 0.0, [], 0
    for r in trains:
        step_tokens = r["tokens_seen"] - previous
        previous = r["tokens_seen"]
        if r["step"] <= warmup:
            continue
        dt = step_tokens / r["tokens_per_s"]
        tokens, seconds = tokens + step_tokens, seconds + dt
        step_ms.append(1000 * dt)
    if not step_ms:
        raise SystemExit(f"no training steps after the {warmup} warmup steps; raise --steps")
    return {
        "tokens_per_s": tokens / seconds,
        "ms_per_step": statistics.median(step_ms),
        "losses": {r["step"]: r["loss"] for r in trains},
        "steps": len(step_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s (default 3)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun run (default 2)")
    ap.add_argument("--preset", default="mini", help="model preset (default mini: ctx 256, emb 256, 4 layers)")
    ap.add_argument("--context", type=int, default=None, help="context length (default: the preset's)")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (default 8)")
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu", help="cpu (gloo ranks; default) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--threads", type=int, default=None, help="threads of the 1-process run (default: all cores)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of both runs; best kept (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if args.global_batch % args.nproc:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --nproc {args.nproc}")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}")

    from gptflow.settings import get_settings
    from gptflow.storage import read_json
    from gptflow.tokenizer import get_tokenizer
    from model.configs import PretrainConfig
    from model.launch import launch
    from model.pretrain import METRICS, pretrain

    # Stages and checkpoints go to a temporary GPTFLOW_HOME (set before any stage is declared; torchrun's ranks
    # inherit it), which shares the real home's download cache: rank 0 of a launch loads the GPT-2 tokenizer.
    downloads = get_settings().downloads_dir.resolve()
    downloads.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gptflow-dp-"))
    (scratch / "home").mkdir()
    (scratch / "home" / "downloads").symlink_to(downloads, target_is_directory=True)
    os.environ["GPTFLOW_HOME"] = str(scratch / "home")
    get_settings.cache_clear()
    try:
        get_tokenizer()  # fail now, not after the first run, when it can be neither read nor downloaded
    except Exception as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SystemExit(f"the GPT-2 tokenizer is unavailable (set GPTFLOW_MIRROR?): {exc}") from None

    cores = usable_cores()
    threads = args.threads or cores
    rank_threads = max(1, threads // args.nproc)
    micro = args.global_batch // args.nproc
    cfg = GPTConfig.from_preset(args.preset, **({"context_length": args.context} if args.context else {}))
    ctx = cfg.context_length
    data = write_corpus(scratch / "corpus", cfg.vocab_size, 1_000_000, max(20_000, 4 * micro * (ctx + 1)))

    common = dict(
        preset=args.preset,
        context_length=args.context,
        steps=args.steps,
        batch_size=micro,
        device=args.device,
        precision=args.precision,
        log_every=1,
        eval_every=None,  # one evaluation, after the last step (outside the records' timing)
        eval_batches=1,
        sample_tokens=0,
        checkpoint_every=args.steps,  # written once, after the last record
    )
    single = PretrainConfig(**common, grad_accum=args.nproc, threads=threads)
    ranked = PretrainConfig(
        **common,
        grad_accum=1,
        threads=rank_threads,
        launcher={"kind": "torchrun", "nproc_per_node": args.nproc},
    )

    def run_single(out: Path) -> tuple[list[dict], float, dict]:
        records: list[dict] = []
        t = time.perf_counter()
        result = pretrain(data, out, single, resume=False, progress=False, on_log=records.append)
        return records, time.perf_counter() - t, result.metrics

    def run_ranked(out: Path) -> tuple[list[dict], float, dict]:
        records: list[dict] = []
        t = time.perf_counter()
        launch(
            "model.pretrain:pretrain",
            (str(data), str(out)),
            {"resume": False, "progress": False},
            config=ranked,
            workdir=scratch / "launch" / out.name,
            on_record=records.append,
        )
        wall = time.perf_counter() - t
        return records, wall, read_json(out / METRICS)["final"]  # the ranks' product, written by rank 0

    print(
        f"torch {torch.__version__}; {cpu_model()}, {cores} usable cores; preset {args.preset} (ctx {ctx}, emb "
        f"{cfg.emb_dim}, {cfg.n_layers} layers, {cfg.n_params() / 1e6:.1f}M params); global batch "
        f"{args.global_batch} x {ctx} = {args.global_batch * ctx} tokens/step; precision {args.precision}; "
        f"device {args.device}; {args.steps} steps, first {args.warmup} not timed"
    )
    best: dict[str, dict] = {}
    try:
        for r in range(args.rounds):
            for name, fn in (("single", run_single), ("ranked", run_ranked)):
                records, wall, metrics = fn(scratch / "runs" / f"{name}-{r}")
                m = {**measured(records, args.warmup), "wall": wall, "setup": metrics}
                print(f"  round {r + 1}, {name}: {m['tokens_per_s']:,.0f} tokens/s, wall {wall:.1f} s")
                if name not in best or m["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = m
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    base = best["single"]["tokens_per_s"]
    backend = "gloo" if args.device == "cpu" else "nccl"
    rows = []
    for name, label, procs, per, accum in (
        ("single", "1 process (in-process pretrain)", 1, threads, args.nproc),
        ("ranked", f"{args.nproc} ranks, torchrun + {backend} (launch)", args.nproc, rank_threads, 1),
    ):
        m = best[name]
        rows.append(
            {
                "run": label,
                "processes x threads": f"{procs} x {per}",
                "micro-batch x accum": f"{micro} x {accum}",
                "world_size (recorded)": m["setup"].get("world_size"),
                "tokens/s": f"{m['tokens_per_s']:,.0f}",
                "ms/step (median)": f"{m['ms_per_step']:.0f}",
                "wall s": f"{m['wall']:.1f}",
                "vs 1 process": f"{m['tokens_per_s'] / base:.2f}x",
            }
        )
    a, b = best["single"]["losses"], best["ranked"]["losses"]
    diff = max(abs(a[s] - b[s]) for s in a.keys() & b.keys())
    table(
        rows,
        f"Data-parallel, {args.preset}, global batch {args.global_batch}, {args.precision} on {args.device} "
        f"(tokens/s over {best['single']['steps']} steps after warmup, from the training records; best of "
        f"{args.rounds} round(s))",
    )
    print(
        f"same micro-batches in both runs: per-step loss max |difference| {diff:.2e} over {len(a)} steps "
        f"(final {a[max(a)]:.4f} vs {b[max(b)]:.4f})"
    )


if __name__ == "__main__":
    main()
