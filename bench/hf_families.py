"""SmolLM2-135M's shape, ours against Hugging Face transformers: loading the model from its Hugging Face folder
(time, peak memory), a training step (tokens/s, peak memory) and greedy generation with the KV cache (tokens/s).

    .venv/bin/python -m bench.hf_families [--preset smollm2-135m] [--threads 2] [--parts import,train,generate]
        [--batch 4] [--context 256] [--warmup 1] [--steps 2] [--prompt-tokens 32] [--new-tokens 64] [--repeats 3]
        [--rounds 2] [--layers N] [--work DIR] [--in-process]

The folder: random weights at the preset's shape, written by transformers' `LlamaForCausalLM(...).save_pretrained`
in bf16 as the real files are (one model.safetensors, no tokenizer: token ids are random). It is written once into
--work (default: a temporary folder) and reused there.

- import: `model.hf_models.load_hf_model(folder)` against `AutoModelForCausalLM.from_pretrained(folder)`, both to
  fp32 (what training uses) and both keeping the files' bf16. Wall time of the call, and the peak resident memory
  of the process over what it held after its imports.
- train: fwd + bwd + fused AdamW + clipping at 1.0, fp32, `--batch` x `--context` random tokens. Ours is
  pretraining's step: `model.features` then `model.pretrain.lm_loss` (on the CPU the fused LM head + cross-entropy
  of model.fused_loss, which never holds the logits). Theirs: `model(input_ids, labels=..., shift_labels=...)`, its
  own loss on the same targets. Both start from the same weights: their first losses must agree. Tokens/s of the
  fastest of --steps steps after --warmup; peak memory = the process's peak resident memory during those steps
  over what it held with the model loaded.
- generate: `--prompt-tokens` random ids, `--new-tokens` greedy tokens at batch 1 with the KV cache: ours
  `model.generate.generate(use_cache=True)`, theirs `generate(do_sample=False, use_cache=True)` with
  min_new_tokens = max_new_tokens. One warm-up run, then the fastest of --repeats; the tokens must be the same.

Every measurement runs --rounds times, ours and transformers taking turns; each engine's best round is kept.
Fastest, not mean: work of other processes on the cores only ever slows a run, and a 2-thread step whose thread
loses its core waits a whole time slice (one decoding step took 220 ms under a load average of 4, 59 ms on quiet
cores).

Each measurement runs in a fresh process (`--in-process` runs them here: quick, but the memory figures then carry
what earlier measurements left). Threads: --threads, for torch in every process. The 2 cores may be shared with
other work: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bench.lm_engines import hf_greedy
from bench.memory import reset_peak, status_kib
from model.config import GPTConfig

PARTS = ("import", "train", "generate")
ENGINES = ("ours", "transformers")
LR, WD, CLIP = 4e-4, 0.1, 1.0
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- the folder


def llama_config(cfg: GPTConfig, dtype: torch.dtype = torch.bfloat16):
    """transformers' `LlamaConfig` for a Llama-family shape (SmolLM2's config.json fields)."""
    from transformers import LlamaConfig

    if cfg.family != "llama":
        raise ValueError(f"a Llama-family shape is needed, got {cfg.family}")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.emb_dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_weights,
        attention_bias=cfg.qkv_bias,
        mlp_bias=cfg.bias,
        bos_token_id=0,
        eos_token_id=0,
        dtype=str(dtype).removeprefix("torch."),
    )


def write_hf_folder(folder: str | Path, cfg: GPTConfig, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Random weights of `cfg`'s shape as transformers writes a Llama checkpoint (`save_pretrained`, in `dtype`);
    kept where it is already written."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg, dtype)).to(dtype)
    model.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------- memory, models


def load(engine: str, folder: Path, dtype: torch.dtype | None = torch.float32):
    """The model, in eval mode; `dtype` None keeps the files' own (bf16)."""
    if engine == "ours":
        from model.hf_models import load_hf_model

        return load_hf_model(folder, dtype=dtype)[0]
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").eval()


# ---------------------------------------------------------------------------------------------- measures


def measure_import(engine: str, folder: str | Path, dtype: str = "fp32") -> dict[str, Any]:
    """Import the engine's loader, then load: seconds of each, and peak resident memory over the imports (MiB)."""
    folder = Path(folder)
    start = time.perf_counter()
    if engine == "ours":
        import model.hf_models  # noqa: F401
    else:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    imported = time.perf_counter()
    after_imports = status_kib("VmRSS")
    reset_peak()
    start_load = time.perf_counter()
    model = load(engine, folder, torch.float32 if dtype == "fp32" else None)
    load_s = time.perf_counter() - start_load
    params = sum(p.numel() for p in model.parameters())
    return {
        "engine": engine,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "import_s": imported - start,
        "load_s": load_s,
        "params": params,
        "rss_after_imports_mib": after_imports / 1024,
        "peak_mib": status_kib("VmHWM") / 1024,
        "peak_over_imports_mib": (status_kib("VmHWM") - after_imports) / 1024,
        "file_mib": sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20,
    }


def _batches(vocab: int, batch: int, context: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (inputs, targets) pairs of random tokens, (batch, context) each, targets the inputs shifted by one."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (batch, context + 1), generator=g) for _ in range(n)]
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def train_step_fn(engine: str, model: torch.nn.Module):
    """One training step on (inputs, targets), (B, T) each -> loss: forward, backward, clipping, fused AdamW."""
    model.train()
    if engine == "ours":
        from model.optim import build_optimizer
        from model.pretrain import lm_loss

        optimizer = build_optimizer(model, LR, WD)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return lm_loss(model.features(x), model.out_head.weight, y)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=(0.9, 0.95), fused=True)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # its loss, on our targets (no shift)
            return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        loss = loss_of(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def measure_train(
    engine: str, folder: str | Path, *, batch: int, context: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Tokens/s of the fastest of `steps` fp32 training steps after `warmup` (and of all of them), the losses, and
    the peak resident memory during the steps over the memory held with the model loaded (MiB)."""
    model = load(engine, Path(folder), torch.float32)
    vocab = model.cfg.vocab_size if engine == "ours" else model.config.vocab_size
    rows = _batches(vocab, batch, context, warmup + steps)
    step = train_step_fn(engine, model)
    loaded = status_kib("VmRSS")
    reset_peak()
    losses = [step(r) for r in rows[:warmup]]
    times = []
    for r in rows[warmup:]:
        start = time.perf_counter()
        losses.append(step(r))
        times.append(time.perf_counter() - start)
    return {
        "engine": engine,
        "tokens_per_s": batch * context / min(times),  # the fastest step: other work on the cores only slows
        "mean_tokens_per_s": batch * context * steps / sum(times),
        "step_s": times,
        "losses": losses,
        "loaded_mib": loaded / 1024,
        "peak_mib": status_kib("VmHWM") / 1024,
        "peak_over_model_mib": (status_kib("VmHWM") - loaded) / 1024,
    }


def measure_generate(
    engine: str, folder: str | Path, *, prompt_tokens: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Greedy generation at batch 1 with the KV cache: one warm-up, then the tokens/s of the fastest of `repeats`
    runs (and their median)."""
    model = load(engine, Path(folder), torch.float32)
    vocab = model.cfg.vocab_size if engine == "ours" else model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(1234))
    if engine == "ours":
        from model.generate import generate

        def run() -> torch.Tensor:
            return generate(model, prompt, new_tokens, eos_id=None, use_cache=True)[0, prompt_tokens:]
    else:

        def run() -> torch.Tensor:
            return hf_greedy(model, prompt, new_tokens, pad_id=0)[0, prompt_tokens:]

    with torch.no_grad():
        run()
        times, tokens = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = run()
            times.append(time.perf_counter() - start)
    if tokens.numel() != new_tokens:
        raise RuntimeError(f"{engine} generated {tokens.numel()} tokens, expected {new_tokens}")
    return {
        "engine": engine,
        "tokens_per_s": new_tokens / min(times),  # the fastest run: other work on the cores only slows
        "median_tokens_per_s": new_tokens / statistics.median(times),
        "seconds": times,
        "tokens": tokens.tolist(),
    }


MEASURES = {"import": measure_import, "train": measure_train, "generate": measure_generate}


def measure(part: str, engine: str, folder: Path, *, threads: int, in_process: bool, **options: Any) -> dict:
    """One measurement, in a fresh `python -m bench.hf_families --child` process unless `in_process`."""
    if in_process:
        torch.set_num_threads(threads)
        return MEASURES[part](engine, folder, **options)
    command = [sys.executable, "-m", "bench.hf_families", "--child", part, "--engine", engine, "--folder", str(folder)]
    command += ["--threads", str(threads), "--options", json.dumps(options)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{part} {engine} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ report


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def run(
    cfg: GPTConfig,
    folder: Path,
    *,
    parts: tuple[str, ...] = PARTS,
    threads: int = 2,
    batch: int = 4,
    context: int = 256,
    warmup: int = 1,
    steps: int = 2,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    rounds: int = 2,
    in_process: bool = False,
    say=print,
) -> dict[str, Any]:
    """Every measurement of `parts` for both engines on the folder of `cfg`'s shape (written if absent), in
    `rounds` interleaved rounds; the best records and the markdown table (one row per figure: ours, transformers,
    ours against transformers)."""
    write_hf_folder(folder, cfg)
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []

    def row(what: str, ours: float, theirs: float, unit: str, higher_better: bool, digits: int = 0) -> None:
        better, worse = ("faster", "slower") if unit in ("s", "tokens/s") else ("less", "more")
        if min(ours, theirs) <= 0:
            versus = "-"
        else:
            ratio = ours / theirs if higher_better else theirs / ours
            versus = f"{ratio:.2f}x {better}" if ratio >= 1 else f"{1 / ratio:.2f}x {worse}"
        rows.append(
            {
                "measure": what,
                "ours": f"{ours:,.{digits}f} {unit}",
                "transformers": f"{theirs:,.{digits}f} {unit}",
                "ours vs transformers": versus,
            }
        )

    def interleaved(part: str, fastest: str, **options: Any) -> dict[str, dict]:
        """`rounds` rounds of ours then transformers, each measurement a fresh process; per engine the round whose
        `fastest` figure is best (other work on the cores only slows a run), with every round's figure beside it."""
        records: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for _ in range(rounds):
            for engine in ENGINES:
                load_average = os.getloadavg()[0]
                record = measure(part, engine, folder, threads=threads, in_process=in_process, **options)
                records[engine].append({**record, "load_average": load_average})
        best = {}
        for engine, runs in records.items():
            pick = min if fastest == "load_s" else max  # seconds: the least; tokens/s: the most
            best[engine] = {**pick(runs, key=lambda r: r[fastest]), "rounds": [r[fastest] for r in runs]}
            best[engine]["load_averages"] = [r["load_average"] for r in runs]
        return best

    if "import" in parts:
        for dtype in ("fp32", "bf16"):
            got = interleaved("import", "load_s", dtype=dtype)
            results[f"import-{dtype}"] = got
            say(f"import {dtype}: " + "; ".join(f"{e} {json.dumps(r)}" for e, r in got.items()))
            ours, theirs = got["ours"], got["transformers"]
            row(f"load to {dtype}: time", ours["load_s"], theirs["load_s"], "s", False, 2)
            row(f"load to {dtype}: peak memory over imports", *(r["peak_over_imports_mib"] for r in (ours, theirs)),
                "MiB", False)  # fmt: skip
    if "train" in parts:
        options = {"batch": batch, "context": context, "warmup": warmup, "steps": steps}
        got = interleaved("train", "tokens_per_s", **options)
        results["train"] = got
        say("train: " + "; ".join(f"{e} {json.dumps(r)}" for e, r in got.items()))
        ours, theirs = got["ours"], got["transformers"]
        row(f"train step fp32, {batch} x {context} tokens", ours["tokens_per_s"], theirs["tokens_per_s"], "tokens/s",
            True)  # fmt: skip
        row("train step: peak memory over the loaded model", ours["peak_over_model_mib"], theirs["peak_over_model_mib"],
            "MiB", False)  # fmt: skip
        results["first_loss_difference"] = abs(ours["losses"][0] - theirs["losses"][0])
    if "generate" in parts:
        options = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats}
        got = interleaved("generate", "tokens_per_s", **options)
        results["generate"] = got
        say("generate: " + "; ".join(f"{e} {r['rounds']} tokens/s" for e, r in got.items()))
        ours, theirs = got["ours"], got["transformers"]
        row(f"greedy generation, batch 1, {prompt_tokens} + {new_tokens} tokens, KV cache", ours["tokens_per_s"],
            theirs["tokens_per_s"], "tokens/s", True, 1)  # fmt: skip
        results["same_tokens"] = ours["tokens"] == theirs["tokens"]
    results["table"] = markdown(rows) if rows else ""
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m", help="a Llama-family preset (default smollm2-135m)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256, help="tokens per training row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed generation runs after one warm-up (fastest)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every measurement (best kept)")
    ap.add_argument("--work", default=None, help="keep the Hugging Face folder here (default: a temporary folder)")
    ap.add_argument("--in-process", action="store_true", help="measure in this process (memory figures then mix)")
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)  # one measurement, printed as JSON
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(MEASURES[args.child](args.engine, args.folder, **json.loads(args.options))))
        return 0
    parts = tuple(p for p in PARTS if p in args.parts.split(","))
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown or not parts:
        ap.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    overrides = {"n_layers": args.layers} if args.layers else {}
    cfg = GPTConfig.from_preset(args.preset, **overrides)
    if cfg.family != "llama":
        ap.error(f"--preset {args.preset} is a {cfg.family} shape; this benchmark writes Llama-family folders")

    from bench.data_parallel import cpu_model

    tmp = None
    if args.work:
        folder = Path(args.work) / f"{args.preset}{'-' + str(args.layers) + 'l' if args.layers else ''}"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gptflow-bench-hf-")
        folder = Path(tmp.name) / args.preset
    import transformers

    started = time.perf_counter()
    load_start = os.getloadavg()
    print(
        f"{args.preset}: {cfg.n_layers} layers x {cfg.emb_dim}, {cfg.n_heads} heads / {cfg.kv_heads} key/value heads, "
        f"vocab {cfg.vocab_size}, {cfg.n_params() / 1e6:.1f}M params; random weights, bf16 files in {folder}"
    )
    print(
        f"machine: {cpu_model()}; {args.threads} threads; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average "
        f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
    )
    try:
        results = run(
            cfg,
            folder,
            parts=parts,
            threads=args.threads,
            batch=args.batch,
            context=args.context,
            warmup=args.warmup,
            steps=args.steps,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            rounds=args.rounds,
            in_process=args.in_process,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    print()
    print(results["table"])
    print()
    if "first_loss_difference" in results:
        train = results["train"]
        print(
            f"first training loss: ours {train['ours']['losses'][0]:.5f}, transformers "
            f"{train['transformers']['losses'][0]:.5f} (|difference| {results['first_loss_difference']:.2g})"
        )
    if "same_tokens" in results:
        print(f"greedy tokens identical: {results['same_tokens']}")
    load_end = os.getloadavg()
    print(
        f"total {time.perf_counter() - started:.0f} s; load average at the end {load_end[0]:.2f} {load_end[1]:.2f} "
        f"{load_end[2]:.2f}" + (" (other work shared the cores)" if max(load_start[0], load_end[0]) > 1 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
