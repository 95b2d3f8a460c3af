"""Export to a Hugging Face GPT-2 folder (`save_hf_gpt2`): `GPT2LMHeadModel.from_pretrained` gives our logits (tied,
untied, no q/k/v bias), `load_gpt2` reads the folder back exactly, `GPT2Tokenizer` reads the tokenizer files, and
a second export replaces the first."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

transformers = pytest.importorskip("transformers")
from transformers import GPT2LMHeadModel, GPT2Tokenizer  # noqa: E402

from gptflow.settings import load_settings  # noqa: E402
from gptflow.tokenizer import tokenizer_files  # noqa: E402
from model.gpt import GPTModel  # noqa: E402
from model.weights import HF_MODEL_FILES, HF_TOKENIZER_FILES, WeightsError, load_gpt2, save_hf_gpt2  # noqa: E402

CASES = {
    "tied": {},
    "untied": {"tie_weights": False},
    "no-qkv-bias": {"qkv_bias": False},
}


def random_model(seed: int, **overrides) -> GPTModel:
    """A tiny GPTModel whose every parameter (biases and LayerNorms too) is random, in eval mode."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_config("gpt", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02 if p.ndim > 1 else 0.1)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_export_with_same_logits(tmp_path, case):
    model = random_model(0, **CASES[case])
    folder = save_hf_gpt2(model, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_MODEL_FILES)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert config["tie_word_embeddings"] is model.cfg.tie_weights
    hf, info = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", output_loading_info=True)
    hf.eval()
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert hf.config.n_positions == 128 and hf.config.n_layer == 2 and hf.config.n_head == 2
    assert hf.config.tie_word_embeddings is model.cfg.tie_weights
    if model.cfg.tie_weights:
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    else:
        assert torch.equal(hf.lm_head.weight, model.out_head.weight)
        assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    assert ours.shape == theirs.shape == (2, 10, 50257)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_load_gpt2_reads_export_back_exactly(tmp_path, case):
    model = random_model(2, **CASES[case])
    loaded, cfg = load_gpt2(save_hf_gpt2(model, tmp_path / "hf"))
    assert cfg == model.cfg.model_copy(update={"qkv_bias": True})
    ours, back = model.state_dict(), loaded.state_dict()
    if not model.cfg.qkv_bias:  # HF GPT-2 always has a q/k/v bias: it comes back as zeros, the same function
        for i in range(model.cfg.n_layers):
            assert torch.equal(back.pop(f"blocks.{i}.attn.qkv.bias"), torch.zeros(3 * model.cfg.emb_dim))
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours), [k for k in ours if not torch.equal(back[k], ours[k])]
    assert (loaded.out_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()) is model.cfg.tie_weights


def test_tokenizer_files_read_by_gpt2_tokenizer(tmp_path, mirror):
    files = tokenizer_files(load_settings(mirror=mirror, home=tmp_path / "home"))
    folder = save_hf_gpt2(random_model(3), tmp_path / "hf", tokenizer_files=files)
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_MODEL_FILES + HF_TOKENIZER_FILES)
    assert (folder / "vocab.json").read_bytes() == files[0].read_bytes()
    assert (folder / "merges.txt").read_bytes() == files[1].read_bytes()
    tok = GPT2Tokenizer.from_pretrained(folder)
    assert tok("Hello, world")["input_ids"] == [15496, 11, 995]
    assert tok("<|endoftext|>")["input_ids"] == [50256]
    assert tok.bos_token == tok.eos_token == tok.unk_token == "<|endoftext|>"
    assert tok.model_max_length == 128


def test_second_export_replaces_first(tmp_path, mirror):
    files = tokenizer_files(load_settings(mirror=mirror, home=tmp_path / "home"))
    folder = tmp_path / "hf"
    save_hf_gpt2(random_model(4), folder, tokenizer_files=files)
    second = random_model(5, tie_weights=False)
    save_hf_gpt2(second, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_MODEL_FILES)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folders left
    loaded, _ = load_gpt2(folder)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_refuses_to_replace_foreign_folder_or_file(tmp_path):
    model = random_model(6)
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    with pytest.raises(WeightsError, match=r"notes holds files that are not .*todo\.txt"):
        save_hf_gpt2(model, keep)
    assert (keep / "todo.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="is not a folder"):
        save_hf_gpt2(model, tmp_path / "file")
    with pytest.raises(WeightsError, match="missing.json does not exist"):
        save_hf_gpt2(model, tmp_path / "hf", tokenizer_files=(tmp_path / "missing.json", tmp_path / "file"))
    assert not (tmp_path / "hf").exists()
