"""bench/lm_generate.py's llama.cpp engines (llamacpp-f16, -q8_0, -q4_0) at tiny shapes: the GGUF vocabulary it
builds for any vocab_size, the files it writes, its greedy runner against our KV-cache loop and llama.cpp's own
greedy sampler, and the command. The real runs (gpt2-small, smollm2-135m shapes) take minutes; their commands
are in docs/benchmarks.md.

Needs llama-cpp-python (`make llama-cpp`): skipped without it, a failure when GPTFLOW_REQUIRE_LLAMA_CPP is set.
"""

from __future__ import annotations

import json
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_config

from bench.llamacpp_engine import (
    bench_vocabulary,
    llamacpp_runner,
    llamacpp_teacher_forced,
    open_llama,
    write_engine_gguf,
)
from bench.lm_generate import LLAMACPP, first_divergence, main, match_rate, measure, torch_runner
from gptflow.settings import load_settings
from model.config import GPT2_VOCAB_SIZE as GPT2_VOCAB
from model.config import GPTConfig
from model.gpt import GPTModel

PROMPT, NEW = 8, 12
# One thread for llama.cpp and torch in these tests: two stall whenever other work takes a core (seconds per test).
# SmolLM2's family (llama: rotary, grouped keys and values, SwiGLU, tied head) with a vocabulary under GPT-2's.
TINY_LLAMA = GPTConfig.from_preset(
    "smollm2-135m", vocab_size=512, context_length=128, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(cfg: GPTConfig) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(cfg).eval()


def _prompt(cfg: GPTConfig, batch: int = 1) -> np.ndarray:
    return torch.randint(0, cfg.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(1234)).numpy()


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, mirror):
    """The `tiny` preset (GPT-2's family and vocabulary), seed 0, and its GGUF in each type."""
    root = tmp_path_factory.mktemp("bench-gguf")
    cfg = tiny_config("gpt")
    model = _model(cfg)
    vocabulary = bench_vocabulary(cfg.vocab_size, load_settings(home=root / "home", mirror=mirror))
    files = {q: write_engine_gguf(model, vocabulary, root / f"model.{q}.gguf", q) for q in ("f16", "q8_0", "q4_0")}
    return cfg, model, files


def test_the_vocabulary_below_gpt2_s_keeps_a_valid_bpe(mirror, tmp_path):
    vocabulary = bench_vocabulary(TINY_LLAMA.vocab_size, load_settings(home=tmp_path, mirror=mirror))
    tokens = vocabulary.tokens
    assert len(tokens) == len(vocabulary.types) == 512 and len(set(tokens)) == 512
    assert tokens[511] == "<|endoftext|>" and vocabulary.types[511] == gguf.TokenType.CONTROL
    assert (vocabulary.bos_id, vocabulary.eos_id, vocabulary.pad_id, vocabulary.pre) == (511, 511, 511, "gpt-2")
    assert tokens[:256] == bench_vocabulary(GPT2_VOCAB, load_settings(home=tmp_path, mirror=mirror)).tokens[:256]
    assert vocabulary.merges and all(
        a in tokens and b in tokens and a + b in tokens for a, b in (m.split(" ") for m in vocabulary.merges)
    )
    assert len(vocabulary.merges) == 255  # ids 256..510 are GPT-2's first 255 merges' results
    padded = bench_vocabulary(50304, load_settings(home=tmp_path, mirror=mirror))
    assert padded.tokens[50303] == "[PAD50303]" and padded.types[50303] == gguf.TokenType.UNUSED


def test_llama_cpp_engines_generate_our_greedy_tokens(llama_cpp, tiny_ggufs):
    """Through the bench's runner and measure(): exactly NEW tokens with time stamps; at this shape f16 and q8_0
    give torch-kv's ids (q4_0 is only counted), which is also what llama.cpp's own greedy sampler picks."""
    cfg, model, files = tiny_ggufs
    prompts = _prompt(cfg)
    _, reference = measure(torch_runner(model, use_cache=True), prompts, NEW, repeats=1, warmup_tokens=2)
    for quant, written in files.items():
        llm = open_llama(llama_cpp, written["path"], cfg.context_length, threads=1)
        result, got = measure(llamacpp_runner(llama_cpp, llm), prompts, NEW, repeats=2, warmup_tokens=NEW)
        assert got.shape == (1, NEW) and got.dtype == np.int64
        assert result["tok_s"] > 0 and result["steady_tok_s"] > 0 and result["ttft_ms"] > 0 and len(result["runs"]) == 2
        llm.reset()
        sampled = [token for _, token in zip(range(NEW), llm.generate(prompts[0].tolist(), temp=0.0))]
        assert sampled == got[0].tolist(), quant  # the argmax is llama.cpp's greedy choice
        if quant in ("f16", "q8_0"):
            assert match_rate(got, reference) == 1.0 and first_divergence(got, reference) is None, quant
            assert llamacpp_teacher_forced(llama_cpp, llm, prompts, reference) == 1.0
        llm.close()
    sizes = {quant: written["mb"] for quant, written in files.items()}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    assert files["q8_0"]["tensor_types"] == {"Q8_0": 9, "F32": 19} and files["q4_0"]["tensor_types"]["Q4_0"] == 8
    assert all(written["write_s"] > 0 for written in files.values())


def test_the_runner_takes_the_threads_and_refuses_a_batch(llama_cpp, tiny_ggufs):
    cfg, _, files = tiny_ggufs
    llm = open_llama(llama_cpp, files["q8_0"]["path"], cfg.context_length, threads=2)
    assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (2, 2)  # --threads, both passes
    with pytest.raises(SystemExit, match="llama-cpp-python decodes one sequence: batch 2 is not measured"):
        llamacpp_runner(llama_cpp, llm)(_prompt(cfg, batch=2), 2)
    llm.close()


def test_a_llama_shape_with_a_cut_vocabulary_loads_and_agrees(llama_cpp, mirror, tmp_path):
    model = _model(TINY_LLAMA)
    vocabulary = bench_vocabulary(TINY_LLAMA.vocab_size, load_settings(home=tmp_path, mirror=mirror))
    written = write_engine_gguf(model, vocabulary, tmp_path / "model.q8_0.gguf", "q8_0")
    llm = open_llama(llama_cpp, written["path"], TINY_LLAMA.context_length, threads=1)
    assert llm.n_vocab() == 512 and llm.metadata["general.architecture"] == "llama"
    prompts = _prompt(TINY_LLAMA)
    _, reference = measure(torch_runner(model, use_cache=True), prompts, NEW, repeats=1, warmup_tokens=2)
    _, got = measure(llamacpp_runner(llama_cpp, llm), prompts, NEW, repeats=1, warmup_tokens=2)
    assert got.tolist() == reference.tolist()
    llm.close()


@pytest.mark.slow
def test_the_command(llama_cpp, settings, tmp_path, capsys):
    """torch-kv and two llama.cpp engines at batches 1 and 2: batch 2 skipped with its reason, GGUF sizes and write
    times next to the ONNX files, the token comparison, every record in the JSON."""
    record = tmp_path / "out.json"
    main(
        ["--preset", "tiny", "--engines", "llamacpp-q4_0,torch-kv,llamacpp-q8_0", "--batches", "1,2", "--threads", "1"]
        + ["--prompt-tokens", "4", "--new-tokens", "6", "--json", str(record), "--work", str(tmp_path / "work")]
    )
    out = capsys.readouterr().out
    assert "llamacpp-q8_0 batch 2: skipped (llama-cpp-python decodes one sequence: batch 1 only)" in out
    assert "files: model.q8_0.gguf " in out and "model.q4_0.gguf " in out and "written in" in out
    assert "INFO llamacpp-q8_0 vs torch-kv greedy tokens (batch 1): free-running match 100.0% (identical)" in out
    assert "| llamacpp-q4_0 | 1 |" in out and "| torch-kv | 2 |" in out and "| llamacpp-q8_0 | 2 |" not in out
    data = json.loads(record.read_text())
    assert [(r["engine"], r["batch"]) for r in data["records"]] == [
        ("torch-kv", 1), ("torch-kv", 2), ("llamacpp-q8_0", 1), ("llamacpp-q4_0", 1)
    ]  # fmt: skip
    assert {(s["engine"], s["batch"]) for s in data["skipped"]} == {("llamacpp-q8_0", 2), ("llamacpp-q4_0", 2)}
    assert data["sizes"]["gguf_q4_0_mb"] < data["sizes"]["gguf_q8_0_mb"] and data["sizes"]["onnx_int8_mb"] > 0
    assert set(data["gguf"]) == {"q8_0", "q4_0"} and data["machine"]["llama_cpp"] == llama_cpp.__version__
    q8 = next(r for r in data["records"] if r["engine"] == "llamacpp-q8_0")
    assert q8["new_tokens"] == 6 and q8["token_match_vs_torch_kv"] == 1.0


def test_without_llama_cpp_the_engines_fail_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    with pytest.raises(SystemExit) as raised:
        main(["--preset", "tiny", "--engines", "torch-kv,llamacpp-q8_0", "--new-tokens", "2"])
    assert str(raised.value) == (
        "the llamacpp-* engines need llama-cpp-python, which is not installed: run `make llama-cpp`"
    )
    assert set(LLAMACPP) == {"llamacpp-f16", "llamacpp-q8_0", "llamacpp-q4_0"}
