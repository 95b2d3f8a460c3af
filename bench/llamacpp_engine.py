"""llama.cpp as an engine of `bench.lm_generate`: our GGUF writer's file, run greedy by llama-cpp-python (built by
`make llama-cpp`), one sequence at a time, with the same runner interface as the other engines: (prompts (1, T),
n) -> (new tokens (1, n), start, per-token time stamps, end)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.lm_engines import Runner
from model.config import GPT2_VOCAB_SIZE
from model.gguf_file import Vocabulary, gpt2_vocabulary, write_gguf
from model.gpt import GPTModel


def llama_cpp_module() -> Any:
    """`llama_cpp`, or a one-line exit saying how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(
            "the llamacpp-* engines need llama-cpp-python, which is not installed: run `make llama-cpp`"
        ) from None
    return llama_cpp


def bench_vocabulary(vocab_size: int, settings: Any = None) -> Vocabulary:
    """A vocabulary llama.cpp loads for a model of `vocab_size` ids, from GPT-2's BPE files
    (`gptflow.tokenizer.tokenizer_files`: the mirror or the network). The bench feeds token ids, so only its
    validity matters: at 50257 or more GPT-2's own (padded with UNUSED `[PADn]` rows); below, GPT-2's first
    vocab_size - 1 tokens, `<|endoftext|>` (CONTROL, the end and padding token) at the last id, and the merges
    whose two parts and result are all kept."""
    from gptflow.tokenizer import tokenizer_files

    if vocab_size <= 256:
        raise SystemExit(f"a GGUF vocabulary needs the 256 byte tokens and one more; the model has {vocab_size}")
    encoder_json, vocab_bpe = tokenizer_files(settings)
    full = gpt2_vocabulary(encoder_json, vocab_bpe, max(vocab_size, GPT2_VOCAB_SIZE), chat_template=None)
    if vocab_size >= GPT2_VOCAB_SIZE:
        return full
    last = vocab_size - 1
    tokens = [*full.tokens[:last], full.tokens[full.eos_id]]
    types = [*full.types[:last], full.types[full.eos_id]]
    kept = set(tokens)

    def inside(merge: str) -> bool:
        left, _, right = merge.partition(" ")
        return left in kept and right in kept and left + right in kept

    merges = [m for m in full.merges if inside(m)]
    return Vocabulary(tokens, types, merges, "gpt-2", last, last, last, False, None)


def write_engine_gguf(model: GPTModel, vocabulary: Vocabulary, path: Path, quant: str) -> dict[str, Any]:
    """Write the GGUF a llama.cpp engine runs: its path, size (MB), write time (s) and tensor count per type."""
    started = time.perf_counter()
    types = write_gguf(model, vocabulary, path, quant, name="gptflow bench.lm_generate")
    return {
        "path": str(path),
        "mb": path.stat().st_size / 1e6,
        "write_s": time.perf_counter() - started,
        "tensor_types": types,
    }


def open_llama(llama_cpp: Any, path: str | Path, n_ctx: int, threads: int, n_batch: int = 512) -> Any:
    """A CPU llama.cpp context on `path`: `threads` for decoding and for the prompt pass, logits of the last
    position only."""
    n_batch = max(1, min(n_batch, n_ctx))
    return llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        logits_all=False,
        seed=0,
        verbose=False,
    )


def _last_logits(llama_cpp: Any, llm: Any) -> np.ndarray:
    """The logits of the last position llama.cpp decoded (a view of its buffer: read before the next eval)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llamacpp_runner(llama_cpp: Any, llm: Any) -> Runner:
    """Greedy decoding of one prompt: `eval` of the prompt (from an empty cache: `reset`, so that no run reuses the
    previous one's prompt), then of each new token; the next token is the argmax of the last logits (the first
    maximum, as llama.cpp's greedy sampler picks)."""

    def run(prompts: np.ndarray, n: int):
        if len(prompts) != 1:
            raise SystemExit(f"llama-cpp-python decodes one sequence: batch {len(prompts)} is not measured")
        new: list[int] = []
        stamps: list[float] = []
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompts[0].tolist())
        for i in range(n):
            new.append(int(np.argmax(_last_logits(llama_cpp, llm))))
            stamps.append(time.perf_counter())
            if i + 1 < n:
                llm.eval(new[-1:])
        end = time.perf_counter()
        return np.asarray([new], dtype=np.int64), start, stamps, end

    return run


def llamacpp_teacher_forced(llama_cpp: Any, llm: Any, prompts: np.ndarray, reference: np.ndarray) -> float:
    """Share of positions where llama.cpp's greedy pick, given the reference continuation so far, is the reference
    token (fed one token at a time: logits of the last position only)."""
    same = 0
    for prompt, ref in zip(prompts, reference):
        llm.reset()
        llm.eval(prompt.tolist())
        for i, token in enumerate(ref.tolist()):
            same += int(np.argmax(_last_logits(llama_cpp, llm))) == token
            if i + 1 < len(ref):
                llm.eval([token])
    return same / reference.size
