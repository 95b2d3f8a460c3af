"""Export to a Hugging Face folder. GPT-2 (`save_hf_model`): `GPT2LMHeadModel.from_pretrained` gives our logits (tied,
untied, no q/k/v bias), `load_gpt2` reads the folder back exactly, `GPT2Tokenizer` reads the tokenizer files, and
a second export replaces the first. Every family (`export_hf`): Llama, Qwen3 and GPT-2 with another vocabulary load
in transformers' `AutoModelForCausalLM` with our logits and their own tokenizer and chat template, and convert back
to the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

transformers = pytest.importorskip("transformers")
from transformers import GPT2LMHeadModel, GPT2Tokenizer  # noqa: E402

from gptflow.settings import load_settings  # noqa: E402
from gptflow.tokenizer import tokenizer_files  # noqa: E402
from model.gpt import GPTModel  # noqa: E402
from model.hf_export import GPT2_TOKENIZER_FILES as HF_TOKENIZER_FILES  # noqa: E402
from model.hf_export import MODEL_FILES as HF_MODEL_FILES  # noqa: E402
from model.hf_export import save_hf_model  # noqa: E402
from model.weights import WeightsError, load_gpt2  # noqa: E402

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
    folder = save_hf_model(model, tmp_path / "hf")
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
    loaded, cfg = load_gpt2(save_hf_model(model, tmp_path / "hf"))
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
    folder = save_hf_model(random_model(3), tmp_path / "hf", gpt2_files=files)
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
    save_hf_model(random_model(4), folder, gpt2_files=files)
    second = random_model(5, tie_weights=False)
    save_hf_model(second, folder)
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
        save_hf_model(model, keep)
    assert (keep / "todo.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="is not a folder"):
        save_hf_model(model, tmp_path / "file")
    with pytest.raises(WeightsError, match="missing.json does not exist"):
        save_hf_model(model, tmp_path / "hf", gpt2_files=(tmp_path / "missing.json", tmp_path / "file"))
    assert not (tmp_path / "hf").exists()


# --- every family: Llama, Qwen3, GPT-2 with another vocabulary, through `load-hf` and `export --format hf` ---------


@pytest.fixture(scope="module")
def converted(tmp_path_factory, mirror) -> dict[str, dict]:
    """Per family (tests/test_family_export.py's tiny random models and tokenizers): the Hugging Face folder, our
    checkpoint of it, and the folder `export_hf` writes back."""
    from hf_fixtures import write_tokenizer
    from test_family_export import FAMILIES, hf_model

    from model.hf_export import export_hf
    from model.hf_models import convert_hf

    root = tmp_path_factory.mktemp("families-hf")
    settings = load_settings(home=root / "home", mirror=mirror)
    out = {}
    for name, style in FAMILIES.items():
        folder = root / name
        vocab = write_tokenizer(root / f"{name}-tokenizer", style).vocab_size
        hf_model(name, vocab).eval().save_pretrained(folder)
        write_tokenizer(folder, style)
        checkpoint, _ = convert_hf(folder, settings)
        report = export_hf(checkpoint, root / f"export-{name}", settings=settings)
        out[name] = {"folder": folder, "checkpoint": checkpoint, "report": report, "settings": settings}
    return out


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2-vocab"])
def test_family_export_loads_in_transformers_with_equal_logits(converted, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptflow.chat_template import ChatTokenizer
    from model.files import CHECKPOINT_LMS
    from model.gpt import mask_positions
    from model.opener import open_model

    family, report = converted[name], converted[name]["report"]
    folder = Path(report["folder"])
    architecture = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(name, "GPT2LMHeadModel")
    assert report["architecture"] == architecture and report["roundtrip_max_abs_logit_diff"] <= 1e-5
    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert type(hf).__name__ == architecture
    ours = open_model(family["checkpoint"], CHECKPOINT_LMS).language_model()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask, position_ids=mask_positions(mask))
        got = hf.eval()(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-4
    original = AutoModelForCausalLM.from_pretrained(family["folder"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(original(ids[:1]).logits, hf(ids[:1]).logits)  # the same model as the one loaded
    tok, theirs = ChatTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "Hello there, what's new?"}]
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == tok.render_chat(chat)
    assert theirs("Order #123 costs $4.50")["input_ids"] == tok.encode(
        "Order #123 costs $4.50", add_special_tokens=True
    )
    assert (folder / "tokenizer.json").read_text() == (family["folder"] / "tokenizer.json").read_text()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_family_export_converts_back_to_the_same_checkpoint(converted, name):
    from model.checkpoint import load_checkpoint
    from model.hf_models import convert_hf

    family = converted[name]
    again, _ = convert_hf(family["report"]["folder"], family["settings"])
    first, second = load_checkpoint(family["checkpoint"]), load_checkpoint(again)
    assert second["config"] == first["config"] and second["tokenizer"] == first["tokenizer"]
    assert all(torch.equal(second["model"][k], v) for k, v in first["model"].items())


def test_a_shape_no_hugging_face_class_has_is_refused():
    from model.hf_export import hf_export_config
    from model.onnx_export import ExportError

    cfg = tiny_config("gpt", mlp="swiglu", norm="rmsnorm")  # learned positions: GPT-2's family, Llama's MLP
    with pytest.raises(
        ExportError, match="a gpt2 model with norm, mlp set as here has no Hugging Face GPT2LMHeadModel"
    ):
        hf_export_config(cfg, torch.float32, None, [])
