"""bench/hf_families.py on a tiny Llama shape: the folder it writes, each measurement, and the command itself (the
real run, at SmolLM2-135M's shape, takes minutes and lives in docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from bench.hf_families import main, measure, run, write_hf_folder
from model.config import GPTConfig

TINY = GPTConfig.from_preset(
    "smollm2-135m", vocab_size=512, context_length=128, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96
)


def test_the_folder_is_a_bf16_llama_checkpoint_of_the_shape(tmp_path):
    folder = write_hf_folder(tmp_path / "hf", TINY)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["hidden_size"], config["num_key_value_heads"], config["rope_parameters"]["rope_theta"]) == (
        64,
        2,
        100000.0,
    )
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_hf_folder(folder, TINY) == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_every_measurement_on_a_tiny_shape(tmp_path):
    lines = []
    results = run(
        TINY, tmp_path / "hf", batch=2, context=16, warmup=1, steps=1, prompt_tokens=4, new_tokens=6, repeats=1,
        threads=2, in_process=True, say=lines.append,
    )  # fmt: skip
    for dtype in ("fp32", "bf16"):
        ours, theirs = results[f"import-{dtype}"]["ours"], results[f"import-{dtype}"]["transformers"]
        assert ours["params"] == theirs["params"] == TINY.n_params()
        assert ours["dtype"] == theirs["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        assert ours["load_s"] > 0 and theirs["peak_over_imports_mib"] >= 0
    train = results["train"]
    assert len(train["ours"]["losses"]) == len(train["transformers"]["losses"]) == 2
    assert results["first_loss_difference"] < 1e-4  # the same weights and targets: the same loss
    assert train["ours"]["tokens_per_s"] > 0 and train["transformers"]["tokens_per_s"] > 0
    assert results["same_tokens"] and len(results["generate"]["ours"]["tokens"]) == 6
    rounds = results["generate"]["transformers"]["rounds"]  # two interleaved rounds, the faster kept
    assert len(rounds) == 2 and results["generate"]["transformers"]["tokens_per_s"] == max(rounds)
    assert results["import-fp32"]["ours"]["load_s"] == min(results["import-fp32"]["ours"]["rounds"])
    table = results["table"].splitlines()
    assert table[0] == "| measure | ours | transformers | ours vs transformers |" and len(table) == 2 + 7
    assert any(line.startswith("| greedy generation, batch 1, 4 + 6 tokens, KV cache |") for line in table)
    assert [line.split(":")[0] for line in lines] == ["import fp32", "import bf16", "train", "generate"]


def test_the_command(tmp_path, capsys):
    args = ["--preset", "llama-mini", "--layers", "1", "--batch", "1", "--context", "8", "--steps", "1"]
    args += ["--prompt-tokens", "3", "--new-tokens", "3", "--repeats", "1", "--parts", "train,generate"]
    assert main([*args, "--in-process", "--work", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama-mini: 1 layers x 256, 4 heads / 2 key/value heads, vocab 50257")
    assert "| train step fp32, 1 x 8 tokens |" in out and "greedy tokens identical: True" in out
    assert "load to fp32" not in out and (tmp_path / "llama-mini-1l" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["--parts", "train,speed"])
    assert "unknown ['speed']" in capsys.readouterr().err


@pytest.mark.subprocess
def test_a_measurement_in_a_fresh_process(tmp_path):
    folder = write_hf_folder(tmp_path / "hf", TINY)
    got = measure("import", "ours", folder, threads=1, in_process=False, dtype="fp32")
    assert got["engine"] == "ours" and got["params"] == TINY.n_params() and got["peak_mib"] > 0
    assert got["rss_after_imports_mib"] > 100  # a process of its own: python, torch and our loader
