"""The LM export for every family: tiny random Hugging Face models (Llama with Llama 3's rotary stretch and an untied
head, Qwen3 with q/k norms and a head wider than emb/heads, GPT-2's architecture with another vocabulary), each with
its locally trained tokenizer and chat template, converted with `load-hf` and exported with int8. The ONNX decoder
(rotary positions, grouped-query KV cache) is within 1e-4 of PyTorch, onnxruntime-genai (the family's model type)
generates our greedy tokens, and `python -m edge generate` answers as `gptflow generate` does with onnxruntime,
numpy, tokenizers and jinja2 only (tiktoken and torch blocked). About 35 s on 2 cores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO_ROOT
from hf_fixtures import write_tokenizer

from cli import main
from edge import BundleError
from edge.hf_tokenizer import HFTokenizer
from edge.lm import Decoder, EdgeGenerator
from edge.runtime import verify_bundle
from gptflow.settings import load_settings
from model.configs import ExportConfig
from model.files import CHECKPOINT_LMS
from model.generate import generate
from model.hf_models import convert_hf
from model.lm_export import export_lm, lm_data_dir
from model.lm_quality import eval_rows
from model.onnx_export import ExportError
from model.opener import open_model

FAMILIES = {"llama": "llama3", "qwen3": "qwen3", "gpt2-vocab": "chatml"}  # model -> tokenizer style
GENAI_TYPES = {"llama": "llama", "qwen3": "qwen3", "gpt2-vocab": "decoder"}
ENTRIES = [
    {"instruction": f"Name {i} colors of the sea.", "input": "" if i % 2 else "Be brief.", "output": f"Blue and {i}."}
    for i in range(8)
]
INSTRUCTION = "What does the river carry?"
NEW_TOKENS = 12

# `python -I -S` with edge/ copied alone and only the venv's site-packages added: every package of ours, torch and
# tiktoken are blocked, so a bundle with its own tokenizer runs on numpy, onnxruntime, tokenizers and jinja2.
STANDALONE = """
import runpy, sys
BLOCKED = {"torch", "tiktoken", "transformers", "pydantic", "prefect", "gptflow", "model", "eval", "data", "tasks",
           "flows", "cli"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path += sys.argv[1:3]
import edge
assert edge.__file__.startswith(sys.argv[1]), edge.__file__
sys.argv = ["edge", *sys.argv[3:]]
runpy.run_module("edge", run_name="__main__")
"""


def hf_model(name: str, vocab_size: int):
    """A random model of the family; initializer_range 0.1 makes its greedy tokens depend on the context."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    if name == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            initializer_range=0.1,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16, "rope_theta": 500000.0},
        )  # fmt: skip
        return LlamaForCausalLM(config)
    if name == "qwen3":
        config = Qwen3Config(
            vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True,
            initializer_range=0.1,
        )  # fmt: skip
        return Qwen3ForCausalLM(config)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1)
    return GPT2LMHeadModel(config)


def write_instructions(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in {"train": ENTRIES[:4], "validation": ENTRIES[4:6], "test": ENTRIES[6:]}.items():
        (folder / f"{name}.json").write_text(json.dumps(part))
    return folder


@pytest.fixture(scope="module")
def families(tmp_path_factory, mirror) -> dict[str, dict]:
    """Per family: the Hugging Face folder, our checkpoint (load-hf) and its int8 export on an instructions folder."""
    root = tmp_path_factory.mktemp("families")
    settings = load_settings(home=root / "home", mirror=mirror)
    data = write_instructions(root / "instructions")
    out = {}
    for name, style in FAMILIES.items():
        folder = root / name
        vocab = write_tokenizer(root / f"{name}-tokenizer", style).vocab_size
        hf_model(name, vocab).eval().save_pretrained(folder)
        write_tokenizer(folder, style)
        checkpoint, _ = convert_hf(folder, settings)
        config = ExportConfig(int8=True, max_eval_rows=4, agreement_tokens=8)
        report = export_lm(checkpoint, data, root / f"export-{name}", config, settings=settings)
        out[name] = {"folder": folder, "checkpoint": checkpoint, "report": report, "bundle": Path(report["bundle"])}
    return out


def _prompt_ids(bundle: Path) -> list[int]:
    return EdgeGenerator(bundle).instruction_ids(INSTRUCTION)


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_parity_int8_gate_and_the_bundle(families, name):
    family = families[name]
    cfg = open_model(family["checkpoint"], CHECKPOINT_LMS).config
    q = family["report"]["quality"]
    assert family["report"]["family"] == {"gpt2-vocab": "gpt2"}.get(name, name)
    assert q["parity"]["steps"] == 32
    assert max(q["parity"]["prompt_max_abs_logit_diff"], q["parity"]["steps_max_abs_logit_diff"]) <= 1e-4
    ppl = q["perplexity"]
    assert ppl["onnx_fp32"] == pytest.approx(ppl["torch_fp32"], rel=1e-5)
    assert abs(q["int8_perplexity_increase_pct"]) <= 3.0 and q["int8_agreement"]["tokens"] == 2 * 8
    manifest = verify_bundle(family["bundle"], "lm")
    tokenizer_files = ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert manifest["tokenizer"] == "hf" and manifest["tokenizer_files"] == tokenizer_files
    assert set(manifest["files"]) == {"model.onnx", "model.int8.onnx", "genai_config.json", "card.md", *tokenizer_files}
    tok = HFTokenizer.from_folder(family["folder"])
    assert manifest["eos_ids"] == tok.eos_ids and manifest["chat_template"] is True
    assert (family["bundle"] / "tokenizer.json").read_text() == (family["folder"] / "tokenizer.json").read_text()
    proto = onnx.load(family["bundle"] / "model.onnx", load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert dims["past_key_values.1.value"] == ["batch_size", cfg.kv_heads, "past_sequence_length", cfg.head_dim]
    int8 = onnx.load(family["bundle"] / "model.int8.onnx")
    assert "MatMulNBits" in {n.op_type for n in int8.graph.node} and "MatMul" not in {
        n.op_type for n in int8.graph.node
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_greedy_tokens_equal_pytorch_with_and_without_cache(families, name):
    family = families[name]
    model = open_model(family["checkpoint"], CHECKPOINT_LMS).language_model()
    decoder = EdgeGenerator(family["bundle"]).decoder
    ids = _prompt_ids(family["bundle"])
    expected = generate(model, torch.tensor([ids]), 24)[0, len(ids) :].tolist()
    assert len(set(expected)) > 2  # the random model says more than one thing
    for use_cache in (True, False):
        assert decoder.generate([ids], 24, eos_id=None, use_cache=use_cache)[0] == expected


@pytest.mark.parametrize("name", FAMILIES)
def test_onnxruntime_genai_generates_our_greedy_tokens(families, name, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    bundle = families[name]["bundle"]
    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["model"]["type"] == GENAI_TYPES[name]
    cfg = open_model(families[name]["checkpoint"], CHECKPOINT_LMS).config
    assert config["model"]["decoder"]["num_key_value_heads"] == cfg.kv_heads
    int8 = shutil.copytree(bundle, tmp_path / "int8")  # genai runs the int8 graph from a copy of the bundle
    config["model"]["decoder"]["filename"] = "model.int8.onnx"
    (int8 / "genai_config.json").write_text(json.dumps(config))
    ids = _prompt_ids(bundle)
    eos_ids = verify_bundle(bundle)["eos_ids"]
    for folder, onnx_file in ((bundle, "model.onnx"), (int8, "model.int8.onnx")):
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + NEW_TOKENS)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        ours = Decoder(bundle / onnx_file, cfg.context_length).generate([ids], NEW_TOKENS, eos_id=eos_ids)[0]
        assert tokens == ours and len(tokens) > 1
    text = "Order #123 costs $4.50, héllo wörld"
    assert og.Tokenizer(og.Model(str(bundle))).encode(text).tolist() == HFTokenizer.from_folder(bundle).encode(text)


@pytest.mark.parametrize("name", FAMILIES)
def test_edge_generate_alone_equals_gptflow_generate(families, name, tmp_path, settings, capsys):
    """The chat template renders the prompt on both sides; the answer stops at any of the model's end tokens."""
    family = families[name]
    shutil.copytree(REPO_ROOT / "edge", tmp_path / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(family["bundle"], tmp_path / "bundle")
    for extra in ([], ["--input", "Be brief."], ["--int8"]):
        args = [str(tmp_path), sysconfig.get_paths()["purelib"], "generate", "bundle", INSTRUCTION]
        args += ["--max-new-tokens", str(NEW_TOKENS), *extra]
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", STANDALONE, *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        if "--int8" in extra:
            assert proc.stdout.strip()
            continue
        argv = ["generate", INSTRUCTION, "--model", str(family["checkpoint"]), "--max-new-tokens", str(NEW_TOKENS)]
        assert main(argv + extra) == 0
        assert proc.stdout == capsys.readouterr().out


def test_corpus_is_encoded_again_with_the_models_tokenizer(families, tokenizer, tmp_path, settings):
    """A corpus folder holds GPT-2 ids; a model with its own vocabulary measures on their text in its own ids."""
    text = " ".join(f"The river carries {i} boats past the old mill before breakfast." for i in range(60))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    np.array(tokenizer.encode(text), dtype=np.uint16).tofile(corpus / "val.bin")
    (corpus / "meta.json").write_text(json.dumps({"tokenizer": "gpt2"}))
    tok = HFTokenizer.from_folder(families["qwen3"]["folder"])
    rows, prompts = eval_rows(corpus, tok, None, 64, ExportConfig(max_eval_rows=3), settings=settings)
    ids = tok.encode(text)
    assert rows == [ids[i * 64 : i * 64 + 65] for i in range(3)] and prompts[0] == ids[:32]
    (corpus / "meta.json").write_text(json.dumps({"tokenizer": "other"}))  # ids of another vocabulary, kept
    with pytest.raises(ExportError, match="outside the model's tokenizer"):
        eval_rows(corpus, tok, None, 64, ExportConfig())


def test_chat_tuned_model_exports_without_data_and_answers_as_gptflow(families, tmp_path, settings, capsys):
    """A Qwen3 tuned in its chat template (style "chat", as `finetune-instructions` saves it): without int8 the export
    needs no data set; int8's gate does (one line before any flow starts when none is found). The bundle renders
    the chat with `enable_thinking=False` and answers without special tokens, as `gptflow generate` does."""
    from edge.__main__ import main as edge_main
    from model.checkpoint import load_checkpoint, save_model

    state = load_checkpoint(families["qwen3"]["checkpoint"])
    model = open_model(families["qwen3"]["checkpoint"], CHECKPOINT_LMS).language_model()
    checkpoint = save_model(tmp_path / "tuned" / "model.pt", model, tokenizer=state["tokenizer"], style="chat")
    opened = open_model(checkpoint, CHECKPOINT_LMS)
    assert opened.kind == "instruct" and lm_data_dir(opened, None, False) is None
    assert main(["export", str(checkpoint), "--int8"]) == 2
    err = capsys.readouterr().err
    assert "--data: int8's perplexity gate needs data to measure on" in err and len(err.strip().splitlines()) == 1
    report = export_lm(checkpoint, None, tmp_path / "fp32", ExportConfig(int8=False), settings=settings)
    assert report["data"] is None and report["quality"]["parity"]["prompt_max_abs_logit_diff"] <= 1e-4
    bundle = tmp_path / "fp32" / "bundle"
    manifest = verify_bundle(bundle, "lm")
    assert manifest["prompt"] == {"style": "chat", "chat_kwargs": {"enable_thinking": False}}
    assert "model.int8.onnx" not in manifest["files"] and "perplexity" not in manifest["quality"]
    assert EdgeGenerator(bundle).text.render_chat("hi", enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(BundleError, match="holds no int8 model"):
        EdgeGenerator(bundle, int8=True)
    argv = [INSTRUCTION, "--input", "Be brief.", "--max-new-tokens", str(NEW_TOKENS)]
    assert edge_main(["generate", str(bundle), *argv]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "--model", str(checkpoint), *argv]) == 0
    assert streamed == capsys.readouterr().out and streamed.strip()
