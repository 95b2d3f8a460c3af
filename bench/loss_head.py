"""The LM head + cross-entropy, forward and backward, on the device at hand: the fused `linear_cross_entropy`
(model.fused_loss) vs the plain `F.cross_entropy(F.linear(h, w).float(), t)`, in fp32 and in the precision
`auto` resolves to on the device (model.device: bf16 on a GPU that has it, fp16 on one that has not; on a CPU bf16
only where it measures faster), at GPT-2 shapes (vocab 50257, emb 768, N = batch x context rows).

    .venv/bin/python -m bench.loss_head [--device auto|cpu|cuda] [--rows 4096 --rows 8192] [--reps 20]

Each timed call is what a training step does with the head: forward under autocast, backward to the hidden
states and the (fp32) head weight, then the gradients dropped (`zero_grad(set_to_none=True)`). The time is the
median of `--reps` calls after warmup (with `torch.cuda.synchronize()` on CUDA); "peak" is the memory the call
allocates above its inputs (CUDA only). The last column says which of the two `model.pretrain.lm_loss` uses on
this device (`FUSED_LOSS_DEVICES`), so a mismatch with the faster one is visible.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.train_throughput import table
from model.device import autocast, cpu_bf16_speedup, runtime
from model.fused_loss import linear_cross_entropy
from model.pretrain import FUSED_LOSS_DEVICES

VOCAB, EMB = 50257, 768


def plain(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), t)


def fused(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return linear_cross_entropy(h, w, t)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA and MPS run asynchronously to Python)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def run_once(fn, h, w, t, precision: str, device: torch.device):
    with autocast(precision, device):
        loss = fn(h, w, t)
    loss.backward()
    return loss


def measure(fn, h, w, t, precision: str, device: torch.device, warmup: int, reps: int) -> tuple[float, float | None]:
    """(median ms, peak MiB above the inputs or None off CUDA) of forward + backward."""
    for _ in range(warmup):
        run_once(fn, h, w, t, precision, device)
        h.grad = w.grad = None
    peak = None
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        run_once(fn, h, w, t, precision, device)
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
        h.grad = w.grad = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return statistics.median(times), peak


def agreement(h, w, t, precision: str, device: torch.device) -> tuple[float, float]:
    """|loss difference| and the max relative difference of the weight gradient, fused vs plain."""
    out = []
    for fn in (plain, fused):
        loss = run_once(fn, h, w, t, precision, device)
        out.append((loss.item(), w.grad.float().clone()))
        h.grad = w.grad = None
    (l1, g1), (l2, g2) = out
    return abs(l1 - l2), ((g1 - g2).abs().max() / g1.abs().max().clamp(min=1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    ap.add_argument(
        "--rows", type=int, action="append", help="N rows (repeatable; default 4096, 8192 on a GPU, 256, 512 on a CPU)"
    )
    ap.add_argument(
        "--precision",
        action="append",
        choices=["fp32", "bf16", "fp16"],
        help="repeatable (default: fp32 and what precision auto resolves to on the device: bf16 on a GPU that has "
        "it, fp16 on one that has not, on a CPU bf16 only where it measures faster than fp32)",
    )
    ap.add_argument("--reps", type=int, default=None, help="timed calls per cell (default 20 on a GPU, 3 on the CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on a GPU, 1 on the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime(args.device, "fp32").device  # the precision is chosen per row below
    gpu = device.type == "cuda"
    rows = args.rows or ([4096, 8192] if gpu else [256, 512])
    reps = args.reps or (20 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    auto = runtime(args.device, "auto").precision  # bf16 on a GPU that has it; on a CPU, what is measured faster
    precisions = args.precision or list(dict.fromkeys(["fp32", auto]))
    unit, unit_name = (1e12, "TFLOP/s") if gpu else (1e9, "GFLOP/s")
    picks = "fused" if device.type in FUSED_LOSS_DEVICES else "plain"
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    tf32 = gpu and torch.backends.cuda.matmul.allow_tf32
    print(
        f"torch {torch.__version__}; device {device} ({where}); vocab {VOCAB}, emb {EMB}; "
        f"median of {reps} after {warmup} warmup"
        + ("; fp32 matmuls use TF32 (model.device turns it on for CUDA)" if tf32 else "")
    )
    if device.type == "cpu" and not args.precision:
        print(
            f"precision auto resolves to {auto} here (bf16 autocast measured at {cpu_bf16_speedup():.2f}x the speed "
            "of fp32)" + ("; --precision bf16 times it anyway" if auto == "fp32" else "")
        )

    results = []
    for n in rows:
        gen = torch.Generator().manual_seed(0)
        h = (torch.randn(n, EMB, generator=gen) * 0.5).to(device).requires_grad_()
        w = (torch.randn(VOCAB, EMB, generator=gen) * 0.02).to(device).requires_grad_()
        t = torch.randint(0, VOCAB, (n,), generator=gen).to(device)
        for precision in precisions:
            try:
                cells = {
                    name: measure(fn, h, w, t, precision, device, warmup, reps)
                    for name, fn in (("plain", plain), ("fused", fused))
                }
                dloss, dgrad = agreement(h, w, t, precision, device)
            except torch.OutOfMemoryError:
                h.grad = w.grad = None
                torch.cuda.empty_cache()
                print(f"rows {n}, {precision}: out of GPU memory; skipped")
                continue
            (p_ms, p_peak), (f_ms, f_peak) = cells["plain"], cells["fused"]
            flop = 6 * n * VOCAB * EMB  # three matmuls: logits, grad of h, grad of w
            row = {
                "rows N": n,
                "precision": precision,
                "plain ms": f"{p_ms:.1f}",
                "fused ms": f"{f_ms:.1f}",
                "plain / fused": f"{p_ms / f_ms:.2f}x",
                f"plain {unit_name}": f"{flop / p_ms / 1e-3 / unit:.1f}",
                f"fused {unit_name}": f"{flop / f_ms / 1e-3 / unit:.1f}",
            }
            if gpu:
                row["plain peak MiB"] = f"{p_peak:,.0f}"
                row["fused peak MiB"] = f"{f_peak:,.0f}"
            row["|loss diff|"] = f"{dloss:.1e}"
            row["grad rel diff"] = f"{dgrad:.1e}"
            row["faster"] = "fused" if f_ms < p_ms else "plain"
            row["lm_loss uses"] = picks
            results.append(row)
        del h, w, t
        if gpu:
            torch.cuda.empty_cache()
    table(results, f"LM head + cross-entropy, forward + backward, on {device}")
    faster = {r["faster"] for r in results}
    verdict = (
        f"matches the faster one in every row ({picks})"
        if faster == {picks}
        else f"picks {picks}; the faster one here: "
        + ", ".join(f"{r['rows N']}/{r['precision']}: {r['faster']}" for r in results)
    )
    print(f"model.pretrain.FUSED_LOSS_DEVICES = {sorted(FUSED_LOSS_DEVICES)}: on {device.type} lm_loss {verdict}")


if __name__ == "__main__":
    main()
