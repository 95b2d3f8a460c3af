"""How `bench.lm_generate` runs each engine and times it: a runner per engine (our PyTorch loop, the ONNX decoder of
edge.lm, transformers' generate; llama.cpp's is `bench.llamacpp_engine`), the timed measurement, and how two runs'
tokens are compared."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from edge.lm import Decoder
from model.generate import generate
from model.gpt import GPTModel
from model.lm_quality import teacher_forced_matches

# A runner: (prompts (B, T) int64, n) -> (new tokens (B, n), start, per-token time stamps, end).
Runner = Callable[[np.ndarray, int], tuple[np.ndarray, float, list[float], float]]


def torch_runner(model: GPTModel, use_cache: bool) -> Runner:
    def run(prompts: np.ndarray, n: int):
        stamps: list[float] = []
        hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
        try:
            start = time.perf_counter()
            out = generate(model, torch.from_numpy(prompts), n, eos_id=None, use_cache=use_cache)
            end = time.perf_counter()
        finally:
            hook.remove()
        return out[:, prompts.shape[1] :].numpy(), start, stamps, end

    return run


def onnx_runner(decoder: Decoder) -> Runner:
    def run(prompts: np.ndarray, n: int):
        stamps: list[float] = []
        start = time.perf_counter()
        new = decoder.generate(prompts.tolist(), n, eos_id=None, on_step=lambda _: stamps.append(time.perf_counter()))
        end = time.perf_counter()
        return np.asarray(new, dtype=np.int64), start, stamps, end

    return run


def hf_greedy(hf_model: Any, ids: torch.Tensor, n: int, pad_id: int, streamer: Any = None) -> torch.Tensor:
    """transformers' greedy generation of exactly `n` new tokens per row with its KV cache (no early stop): the
    sequences, prompt included."""
    return hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad_id,
        streamer=streamer,
    )


def transformers_runner(hf_model: Any, pad_id: int) -> Runner:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        """Time stamps of the new tokens (generate first puts the prompt: skipped)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def run(prompts: np.ndarray, n: int):
        ids = torch.from_numpy(prompts)
        streamer = Stamps()
        with torch.no_grad():
            start = time.perf_counter()
            out = hf_greedy(hf_model, ids, n, pad_id, streamer)
            end = time.perf_counter()
        return out[:, prompts.shape[1] :].numpy(), start, streamer.times, end

    return run


def measure(
    run: Runner, prompts: np.ndarray, n: int, repeats: int, warmup_tokens: int
) -> tuple[dict[str, Any], np.ndarray]:
    """One warm-up run of `warmup_tokens`, then `repeats` timed runs of `n`: medians of tok/s, steady tok/s and
    TTFT, and the tokens of the last run."""
    run(prompts, warmup_tokens)
    runs, tokens = [], None
    for _ in range(repeats):
        tokens, start, stamps, end = run(prompts, n)
        if tokens.shape != (len(prompts), n) or len(stamps) != n:
            raise SystemExit(f"expected {n} new tokens per row and {n} time stamps, got {tokens.shape}, {len(stamps)}")
        batch = len(prompts)
        runs.append(
            {
                "seconds": end - start,
                "tok_s": batch * n / (end - start),
                "steady_tok_s": batch * (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan"),
                "ttft_ms": 1e3 * (stamps[0] - start),
            }
        )
    summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return {**summary, "runs": runs}, tokens


def match_rate(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def first_divergence(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first token index where any row differs (None: identical)."""
    differs = np.flatnonzero((a != b).any(axis=0))
    return int(differs[0]) if len(differs) else None


def teacher_forced(decoder: Decoder, prompts: np.ndarray, reference: np.ndarray) -> float:
    """Share of positions where `decoder`'s greedy pick, given the reference continuation so far, is the
    reference token (one pass per row over prompt + reference)."""
    return sum(teacher_forced_matches(decoder, p, ref) for p, ref in zip(prompts, reference)) / reference.size


def versions() -> dict[str, str]:
    """The engines' versions (transformers and llama-cpp-python may be absent)."""
    import onnxruntime

    out = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = "not installed"
    try:
        import llama_cpp

        out["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        out["llama_cpp"] = "not installed"
    return out
