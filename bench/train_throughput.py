"""Training throughput (tokens/s) of our GPT training step vs the book-style baseline, measured in one run.

    .venv/bin/python -m bench.train_throughput [--quick] [--threads 2] [--rounds 2] [--curve-steps 200]
    .venv/bin/python -m bench.train_throughput --device cuda --preset gpt2-small --preset gpt2-medium \
        --context 1024 --batch 8 --variants ours-fp32,ours-bf16 --curve-steps 0

Config A (the issue's): vocab 50257, context 256, emb 256, 4 layers, 4 heads, batch 8, AdamW.
Config B: gpt2-small shapes, context 256, batch 2. `--preset NAME` (repeatable) replaces A and B with model
presets at `--context` (default 256) and `--batch` (default 8; 2 for the CPU and presets wider than 256).
MFU is against fp32/bf16 matmul peaks measured here (2048^2 on the CPU, 8192^2 on CUDA, where fp32 matmuls run
as TF32 because model.device turns TF32 on, so the "fp32" peak and "ours fp32" are TF32's).
"Ours" is pretraining's own step: `model.pretrain.lm_loss` (on the CPU the fused LM head + cross-entropy of
model.fused_loss, elsewhere F.linear + F.cross_entropy), fused AdamW, clipping. `--device` (default auto: CUDA,
then MPS, then the CPU) puts models and batches there; on CUDA every timing is bracketed by
torch.cuda.synchronize(), a variant that runs out of memory is reported as OOM, and a peak-memory column is added.
The loss-curve check trains ours (config A) in fp32 and in bf16 for the first N steps on tiny Shakespeare with
the same seed and data, and prints both curves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.naive_gpt import naive_from
from model.config import GPTConfig
from model.device import autocast, runtime
from model.gpt import GPTModel
from model.optim import build_optimizer
from model.pretrain import lm_loss

LR, WD = 4e-4, 0.1  # the book's pretraining settings


VARIANTS = {  # name: (kind, bf16, compile)
    "baseline": ("naive", False, False),
    "baseline-bf16": ("naive", True, False),
    "ours-fp32": ("ours", False, False),
    "ours-bf16": ("ours", True, False),
    "ours-bf16-compile": ("ours", True, True),
}
LABELS = {
    "baseline": "baseline (book)",
    "baseline-bf16": "baseline bf16",
    "ours-fp32": "ours fp32",
    "ours-bf16": "ours bf16",
    "ours-bf16-compile": "ours bf16 + compile",
}
CONFIG_A = GPTConfig(context_length=256, emb_dim=256, n_layers=4, n_heads=4)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA and MPS run asynchronously to Python)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak(
    dtype: torch.dtype, n: int = 2048, reps: int = 6, device: torch.device | str = "cpu", budget_s: float = 10.0
) -> float:
    """FLOP/s of `reps` (n x n) @ (n x n) matmuls in `dtype` on `device`. A probe at n/4 first: where the dtype
    has no fast kernels (bf16 on CPUs without native bf16 runs at well under 1 GFLOP/s) `n` is halved until the
    timed matmuls fit in about `budget_s`, instead of taking minutes."""
    device = torch.device(device)
    probe = torch.randn(n // 4, n // 4, dtype=dtype, device=device)
    probe @ probe
    sync(device)
    t = time.perf_counter()
    probe @ probe
    sync(device)
    estimate = (time.perf_counter() - t) * 64 * (reps + 2)  # the full-size matmuls, warmup included
    while n > 256 and estimate > budget_s:
        n, estimate = n // 2, estimate / 8
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token: 6 x matmul params (blocks + head) + attention scores (PaLM appendix B)."""
    n = cfg.n_layers * 12 * cfg.emb_dim**2 + cfg.vocab_size * cfg.emb_dim
    return 6 * n + 12 * cfg.n_layers * cfg.context_length * cfg.emb_dim


def train_steps(model, optimizer, batches, *, bf16: bool, compile: bool, clip: float | None):
    """Ours runs pretraining's loss path (`lm_loss`); the baseline the book's logits + loss. The model's device
    is the autocast's."""
    model.train()
    device = next(model.parameters()).device
    losses = []
    if isinstance(model, GPTModel):
        features = torch.compile(model.features) if compile else model.features

        def loss_of(x, y):
            return lm_loss(features(x), model.out_head.weight, y)
    else:
        fwd = torch.compile(model) if compile else model

        def loss_of(x, y):
            return F.cross_entropy(fwd(x).flatten(0, 1).float(), y.flatten())

    def step(x, y):
        with autocast("bf16" if bf16 else "fp32", device):
            loss = loss_of(x, y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for x, y in batches:
        losses.append(step(x, y))
    return losses, step


def variant(kind: str, cfg: GPTConfig, device: torch.device | str = "cpu"):
    torch.manual_seed(0)
    if kind == "ours":
        model = GPTModel(cfg).to(device)
        return model, build_optimizer(model, LR, WD), 1.0
    model = naive_from(cfg).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD), None


def measure(kind, cfg, batch, *, bf16, compile, warmup, steps, device=torch.device("cpu")) -> tuple[float, int]:
    """(tokens/s, peak bytes allocated on CUDA, else 0) of `steps` training steps after `warmup`."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, opt, clip = variant(kind, cfg, device)
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), generator=gen).to(device),) * 2
        for _ in range(warmup + steps)
    ]
    _, step = train_steps(model, opt, data[:warmup], bf16=bf16, compile=compile, clip=clip)
    sync(device)
    t = time.perf_counter()
    for x, y in data[warmup:]:
        step(x, y)
    sync(device)
    tps = batch * cfg.context_length * steps / (time.perf_counter() - t)
    return tps, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def shakespeare_tokens() -> np.ndarray | None:
    try:
        from gptflow.download import fetch_source
        from gptflow.tokenizer import encode, get_tokenizer

        return np.array(encode(get_tokenizer(), fetch_source("tinyshakespeare").read_text()), dtype=np.int64)
    except Exception as exc:  # no mirror/network: the throughput tables still run
        print(f"(loss-curve check skipped: tiny Shakespeare unavailable: {exc})")
        return None


def table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--curve-steps", type=int, default=None, help="loss-curve steps (default 200, quick 20; 0 skips)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per variant (best is kept)")
    ap.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then the CPU) | cpu | cuda[:N]")
    ap.add_argument("--preset", action="append", help="model preset to time instead of configs A and B (repeatable)")
    ap.add_argument("--context", type=int, default=256, help="context length of --preset configs (default 256)")
    ap.add_argument(
        "--batch", type=int, default=None, help="batch of --preset configs (default 8; 2 on a CPU for emb > 256)"
    )
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)} (default all; the first is the ratios' baseline)",
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 15, quick 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 2)")
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    device = runtime(args.device, "fp32").device  # the precision is each variant's
    gpu = device.type == "cuda"
    warmup, steps = (2, 4) if args.quick else (3, 15)
    warmup = args.warmup if args.warmup is not None else warmup
    steps = args.steps or steps
    curve_steps = args.curve_steps if args.curve_steps is not None else (20 if args.quick else 200)

    big = 8192 if gpu else 2048
    peak32 = matmul_peak(torch.float32, big, 20 if gpu else 6, device)
    peak16 = matmul_peak(torch.bfloat16, big, 20 if gpu else 6, device)
    unit, unit_name = (1e12, "TFLOP/s") if gpu else (1e9, "GFLOP/s")
    tf32 = gpu and torch.backends.cuda.matmul.allow_tf32
    where = torch.cuda.get_device_name(device) if gpu else f"{args.threads} threads"
    print(
        f"torch {torch.__version__}, {device} ({where}); matmul peak fp32{' (TF32)' if tf32 else ''} "
        f"{peak32 / unit:.0f} {unit_name}, bf16 {peak16 / unit:.0f} {unit_name} (measured now"
        + ("" if gpu else "; other processes share the cores: numbers are noisy")
        + ")"
        + ("; fp32 variants run their matmuls as TF32 (model.device turns TF32 on)" if tf32 else "")
    )
    if peak16 < peak32:
        print(
            f"bf16 matmuls run at {peak16 / peak32:.2g}x the fp32 speed here: no fast bf16 path on this {device.type}"
        )

    if args.preset:
        configs = []
        for name in args.preset:
            cfg = GPTConfig.from_preset(name, context_length=args.context)
            batch = args.batch or (2 if not gpu and cfg.emb_dim > 256 else 8)
            configs.append((f"{name}: ctx {args.context}, batch {batch}", cfg, batch))
    else:
        configs = [
            ("A: ctx 256, emb 256, 4 layers, 4 heads, batch 8", CONFIG_A, 8),
            ("B: gpt2-small shapes, ctx 256, batch 2", GPTConfig.from_preset("gpt2-small", context_length=256), 2),
        ]
    auto = runtime(args.device, "auto").precision  # what pretraining's default precision resolves to here
    labels = {**LABELS, f"ours-{auto}": f"{LABELS[f'ours-{auto}']} (auto)"} if f"ours-{auto}" in LABELS else LABELS
    variants = [
        (labels[v], *VARIANTS[v])
        for v in args.variants.split(",")
        if not (VARIANTS[v][2] and args.no_compile)  # --no-compile drops the compiled variant
    ]
    for title, cfg, batch in configs:
        fpt = flops_per_token(cfg)
        chosen = [v for v in variants if not (v[3] and cfg.emb_dim > 256 and args.quick)]
        n = steps if gpu or cfg.emb_dim <= 256 else max(2, steps // 3)
        best: dict[str, float | None] = {name: 0.0 for name, *_ in chosen}
        peak_mem = {name: 0 for name, *_ in chosen}
        for _ in range(args.rounds):  # interleaved rounds, best of each: no variant gets only a cold machine
            for name, kind, bf16, comp in chosen:
                if best[name] is None:  # ran out of memory in an earlier round
                    continue
                try:
                    tps, mem = measure(
                        kind,
                        cfg,
                        batch,
                        bf16=bf16,
                        compile=comp,
                        warmup=warmup + (2 if comp else 0),
                        steps=n,
                        device=device,
                    )
                except torch.OutOfMemoryError:
                    best[name] = None
                    print(f"{title}: {name} ran out of GPU memory")
                else:
                    best[name], peak_mem[name] = max(best[name], tps), max(peak_mem[name], mem)
                finally:
                    if gpu:
                        torch.cuda.empty_cache()
        base = best[chosen[0][0]]
        rows = []
        for name, tps in best.items():
            if tps is None:
                rows.append({"variant": name, "tokens/s": "OOM"})
                continue
            row = {
                "variant": name,
                "tokens/s": f"{tps:,.0f}",
                "vs baseline": f"{tps / base:.2f}x" if base else "-",
                unit_name: f"{tps * fpt / unit:.{1 if gpu else 0}f}",
                f"MFU fp32{' (TF32)' if tf32 else ''} peak": f"{tps * fpt / peak32:.0%}",
                "MFU bf16 peak": f"{tps * fpt / peak16:.0%}" if peak16 >= peak32 else "-",  # no fast bf16 here
            }
            if gpu:
                row["peak GiB"] = f"{peak_mem[name] / 2**30:.1f}"
            rows.append(row)
        cols = list(next((r for r in rows if len(r) > 2), rows[0]))
        table(
            [{c: r.get(c, "") for c in cols} for r in rows],
            f"{title} ({fpt / 1e6:.0f} MFLOP/token; best of {args.rounds} interleaved rounds of {n} steps; "
            f"ratios against {chosen[0][0]})",
        )

    tokens = shakespeare_tokens() if curve_steps else None
    if tokens is not None:
        cfg, batch = CONFIG_A, 8
        gen = torch.Generator().manual_seed(123)
        starts = torch.randint(0, len(tokens) - cfg.context_length - 1, (curve_steps, batch), generator=gen)
        data = [
            (
                torch.from_numpy(np.stack([tokens[s : s + cfg.context_length] for s in row.tolist()])).to(device),
                torch.from_numpy(np.stack([tokens[s + 1 : s + cfg.context_length + 1] for s in row.tolist()])).to(
                    device
                ),
            )
            for row in starts
        ]
        curves = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            model, opt, clip = variant("ours", cfg, device)
            t = time.perf_counter()
            curves[name], _ = train_steps(model, opt, data, bf16=bf16, compile=False, clip=clip)
            print(f"loss curve {name}: {curve_steps} steps in {time.perf_counter() - t:.0f}s")
        marks = sorted({0, *range(24, curve_steps, 25), curve_steps - 1})
        smooth = {k: np.convolve(v, np.ones(10) / 10, mode="valid") for k, v in curves.items()}
        table(
            [
                {"step": m + 1, "fp32 loss": f"{curves['fp32'][m]:.4f}", "bf16 loss": f"{curves['bf16'][m]:.4f}"}
                for m in marks
            ],
            f"Loss curve, config A on tiny Shakespeare, {device} (same seed and batches, book lr {LR})",
        )
        raw = np.abs(np.array(curves["fp32"]) - np.array(curves["bf16"]))
        print(f"per-step |fp32 - bf16| loss: max {raw.max():.5f}, mean {raw.mean():.5f}")
        diff = np.abs(smooth["fp32"] - smooth["bf16"])
        print(
            f"max |fp32 - bf16| of the 10-step moving average: {diff.max():.3f} "
            f"(mean {diff.mean():.3f}); final 10-step averages fp32 {smooth['fp32'][-1]:.3f}, "
            f"bf16 {smooth['bf16'][-1]:.3f}"
        )


if __name__ == "__main__":
    main()
