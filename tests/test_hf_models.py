"""Hugging Face models of three families enter gptflow: random-weight folders written by transformers'
`save_pretrained` (GPT-2 in distilgpt2's layer shape and with another vocabulary, Llama in SmolLM-135M's shape with two
layers, Llama 3.2 with its rotary scaling, Qwen3 small) load with logits and greedy tokens equal to transformers',
convert with their tokenizer to a checkpoint, and generate through the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hf_fixtures import write_hub_mirror, write_tokenizer

from cli import main
from gptflow.settings import load_settings
from gptflow.tokenizer import model_tokenizer
from model.checkpoint import load_checkpoint
from model.files import WeightsError
from model.generate import generate
from model.gpt import mask_positions
from model.hf_models import convert_hf, load_hf_model, read_hf_config

FAMILIES = ("smollm", "llama32", "qwen3", "gpt2-vocab", "distilgpt2")


def _hf_model(name: str, vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    if name == "smollm":  # SmolLM-135M's layer shape, two layers
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=576, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
            intermediate_size=1536, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if name == "llama32":  # Llama 3.2's rotary scaling, with an original context short enough to matter here
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16, "rope_theta": 500000.0},
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if name == "qwen3":  # a head wider than emb/heads, as Qwen3's 128
        config = Qwen3Config(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True,
        )  # fmt: skip
        return Qwen3ForCausalLM(config)
    if name == "gpt2-vocab":  # GPT-2's architecture trained with another vocabulary
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256))
    return GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=2, n_head=12))  # distilgpt2's layer shape, 2 of its 6


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory, mirror) -> dict[str, Path]:
    """Each family's folder: the model's files, then the tokenizer's (written last: its generation_config.json
    with the model's end tokens is the one a real repo has)."""
    from transformers import GPT2TokenizerFast

    root = tmp_path_factory.mktemp("hf")
    styles = {"smollm": "chatml", "llama32": "llama3", "qwen3": "qwen3", "gpt2-vocab": "chatml"}
    folders = {}
    for name in FAMILIES:
        folder = root / name
        if name == "distilgpt2":
            _hf_model(name, 0).eval().save_pretrained(folder)
            gpt2 = mirror / "openaipublic.blob.core.windows.net/gpt-2/encodings/main"
            GPT2TokenizerFast(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe")).save_pretrained(folder)
        else:
            vocab = write_tokenizer(root / f"{name}-tokenizer", styles[name]).vocab_size
            _hf_model(name, vocab).eval().save_pretrained(folder, max_shard_size="2MB")
            write_tokenizer(folder, styles[name])
        folders[name] = folder
    return folders


def _transformers(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_logits_equal_transformers(hf_folders, name):
    folder = hf_folders[name]
    ours, cfg = load_hf_model(folder)
    theirs = _transformers(folder)
    assert cfg.family == {"smollm": "llama", "llama32": "llama", "qwen3": "qwen3"}.get(name, "gpt2")
    assert ours.num_params() == cfg.n_params() == theirs.num_parameters()
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, :9], mask[2, :25] = 0, 0  # left padding
    positions = mask_positions(mask)
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() < 1e-4
    assert got[real].abs().max().item() > 0.05  # not a model of zeros


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_with_kv_cache_equal_transformers_generate(hf_folders, name):
    from transformers import GenerationConfig

    folder = hf_folders[name]
    ours, cfg = load_hf_model(folder)
    theirs = _transformers(folder)
    prompt = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    got = generate(ours, prompt, 32, use_cache=True)
    assert got.shape == (1, 40)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 8:].tolist())) > 1  # the model says more than one token


def test_bf16_files_load_as_fp32_or_stay_bf16(hf_folders, tmp_path):
    folder = tmp_path / "bf16"
    _transformers(hf_folders["qwen3"]).to(torch.bfloat16).save_pretrained(folder)
    fp32, _ = load_hf_model(folder)
    bf16, _ = load_hf_model(folder, dtype=None)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(fp32.blocks[1].attn.qkv.weight, bf16.blocks[1].attn.qkv.weight.float())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(bf16(ids)).all()


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(WeightsError) as info:
        read_hf_config(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'config.json'}: architectures ['MistralForCausalLM'] is not supported; supported: "
        "GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM"
    )
    assert main(["load-hf", str(tmp_path)]) == 2  # refused before any flow starts


def test_missing_shard_and_missing_tokenizer_are_named(hf_folders, tmp_path):
    folder = shutil.copytree(hf_folders["smollm"], tmp_path / "smollm")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=rf"shard {shard.name} is missing from {folder}"):
        load_hf_model(folder)
    folder = shutil.copytree(hf_folders["qwen3"], tmp_path / "qwen3")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(
        WeightsError, match="has no tokenizer.json; a model whose vocabulary is not GPT-2's needs its own"
    ):
        convert_hf(folder, load_settings(home=tmp_path / "home"))


def test_load_hf_then_generate_uses_the_chat_template(hf_folders, prefect_harness, settings, capsys):
    """`load-hf FOLDER` keeps the tokenizer in the checkpoint; `generate` renders the prompt with the model's chat
    template and prints the response: the tokens transformers generates for the same rendered prompt."""
    from transformers import AutoTokenizer, GenerationConfig

    folder = hf_folders["smollm"]
    assert main(["load-hf", str(folder)]) == 0
    out = capsys.readouterr().out
    path = re.search(r"^model: (.+)$", out, re.M).group(1)
    assert out.startswith(f"converted {folder}") and path == str(settings.home / "models" / "smollm" / "model.pt")
    state = load_checkpoint(path)
    assert state["tokenizer"]["tokenizer.json"] == (folder / "tokenizer.json").read_text()
    assert state["config"]["positions"] == "rope" and state["config"]["n_kv_heads"] == 3
    assert main(["load-hf", str(folder)]) == 0 and capsys.readouterr().out.startswith("reused")

    assert main(["generate", "What is a spam message?", "--model", path, "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    hf_tok = AutoTokenizer.from_pretrained(folder)
    ids = hf_tok.apply_chat_template(
        [{"role": "user", "content": "What is a spam message?"}], add_generation_prompt=True, return_dict=False
    )
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=hf_tok.eos_token_id, pad_token_id=0)
    with torch.no_grad():
        expected = _transformers(folder).generate(torch.tensor([ids]), generation_config=config)[0, len(ids) :]
    expected = [t for t in expected.tolist() if t != hf_tok.eos_token_id]
    assert printed == hf_tok.decode(expected) + "\n"


def test_gpt2_vocabulary_is_read_by_tiktoken(hf_folders, settings):
    """distilgpt2's tokenizer.json is GPT-2's BPE: the checkpoint keeps no tokenizer and tiktoken reads it."""
    path, reused = convert_hf(hf_folders["distilgpt2"], settings)
    state = load_checkpoint(path)
    assert not reused and "tokenizer" not in state
    assert model_tokenizer(None, settings).encode("Hello, world<|endoftext|>") == [15496, 11, 995, 50256]
    path, _ = convert_hf(hf_folders["gpt2-vocab"], settings)  # GPT-2's shape, another vocabulary: its own tokenizer
    assert "tokenizer.json" in load_checkpoint(path)["tokenizer"]


def test_load_hf_by_name_through_the_mirror(hf_folders, tmp_path):
    mirror = tmp_path / "mirror"
    write_hub_mirror(mirror, "Qwen/Qwen3-0.6B", hf_folders["qwen3"])
    settings = load_settings(mirror=mirror, home=tmp_path / "home")
    path, reused = convert_hf("Qwen/Qwen3-0.6B", settings)
    assert path == tmp_path / "home/models/Qwen--Qwen3-0.6B/model.pt" and not reused
    state = load_checkpoint(path)
    assert state["source"] == "Qwen/Qwen3-0.6B" and state["config"]["qk_norm"] is True
    assert set(state["tokenizer"]) >= {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}


def test_pretrain_a_llama_family_preset_from_scratch(prefect_harness, settings, capsys):
    """`--preset llama-mini`: RMSNorm, SwiGLU, rotary positions and grouped-query attention trained by the same
    loop (fused loss included) that trains GPT-2 presets, then read back by `generate` with GPT-2's BPE."""
    args = ["pretrain", "--corpus", "the-verdict", "--preset", "llama-mini", "--steps", "6", "--batch-size", "2"]
    args += ["--context-length", "32", "--eval-every", "3", "--checkpoint-every", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    path = re.search(r"^model: (.+)$", out, re.M).group(1)
    state = load_checkpoint(path)
    assert state["config"]["n_kv_heads"] == 2 and state["config"]["mlp"] == "swiglu" and "tokenizer" not in state
    assert state["data_dir"] == str(settings.home / "data" / "corpus" / "the-verdict")  # export --int8's default
    losses = [float(v) for v in re.findall(r"val loss (\d+\.\d+)", out)]
    assert losses and losses[0] < 10.8  # ln(50257) = 10.82: six steps already learn something
    assert main(["generate", "Every effort moves you", "--model", path, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Every effort moves you")


def test_a_llama_folder_given_as_a_model_says_to_convert_it(hf_folders, capsys):
    folder = hf_folders["smollm"]
    assert main(["generate", "Hi", "--model", str(folder)]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"{folder} is a Hugging Face LlamaForCausalLM model folder: convert it with `gptflow load-hf {folder}` and "
            "pass the checkpoint it prints"
        )
    )
