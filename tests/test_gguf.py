"""GGUF export (model.gguf_file, model.gguf_export, gptflow.modelfile), checked by llama.cpp itself.

The file's format is read back with `gguf`'s reader in the unit tier. The llama.cpp tier loads every family's export
in llama-cpp-python (`make llama-cpp` builds it; `.ci/run` sets GPTFLOW_REQUIRE_LLAMA_CPP=1, which turns its absence
into a failure rather than a skip): f16 logits within 1e-2 of PyTorch's, Q8_0 greedy tokens teacher-forced against
ours on at least 95% of 32 tokens per prompt, llama.cpp's token ids equal ours on hard strings, and the GGUF's chat
template rendering the prompt the model was tuned on.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jinja2.sandbox
import numpy as np
import pytest
import torch
from conftest import tiny_config
from hf_fixtures import corpus, write_tokenizer

from gptflow.modelfile import Modelfile, ModelfileError, frame_template
from gptflow.prompts import CHAT_KWARGS, chat_prompt, format_prompt, frame_chat_template, prompt_frame
from gptflow.settings import load_settings
from model.checkpoint import save_model
from model.configs import ExportConfig
from model.files import CHECKPOINT_LMS
from model.generate import generate
from model.gguf_export import export_gguf
from model.gguf_file import F16, F32, Q8_0, permute_rotary, pre_tokenizer_name, tensor_type
from model.gpt import GPTModel
from model.hf_models import convert_hf
from model.onnx_export import ExportError
from model.opener import open_model

# name -> (tokenizer style or "gpt2", prompt style the checkpoint records)
FAMILIES = {
    "gpt2": ("gpt2", "alpaca"),
    "llama": ("llama3", "chat"),
    "qwen3": ("qwen3", "chat"),
    "smollm": ("chatml", None),
}
PROMPTS = ["The river carries water to the sea.", "Name three colors of the sky at night", "12 boats, 345 fish"]
HARD = [
    "Hello, world",
    "  runs   of  spaces\n\n\ttabs",
    "digits 1 12 123 1234 12345",
    "héllo wörld ñ 日本語 😀🚀",
    "a<|endoftext|>b",
]
NEW_TOKENS = 32


def test_pre_tokenizer_names_follow_the_tokenizer_structure(tmp_path):
    names = {}
    for style in ("chatml", "llama3", "qwen3"):
        spec = json.loads((write_tokenizer(tmp_path / style, style).folder / "tokenizer.json").read_text())
        names[style] = pre_tokenizer_name(spec["pre_tokenizer"])
    assert names == {"chatml": "smollm", "llama3": "llama-bpe", "qwen3": "qwen2"}
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False}) == "gpt-2"
    with pytest.raises(ExportError, match=r"no llama.cpp pre-tokenizer matches this tokenizer's \(Whitespace\)"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_rotary_permutation_interleaves_each_heads_halves():
    rows = torch.arange(8.0).reshape(8, 1)  # two heads of 4: halves (0 1 | 2 3), (4 5 | 6 7)
    assert permute_rotary(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_modelfile_round_trip_and_one_line_errors(tmp_path):
    modelfile = Modelfile(
        "model.gguf",
        frame_template("<|user|>\n", "\n<|assistant|>:\n", "<|endoftext|>"),
        ("<|endoftext|>", "<|im_end|>"),
        {"num_ctx": 256, "temperature": 0.6, "top_k": 20},
    )
    path = tmp_path / "Modelfile"
    path.write_text(modelfile.text())
    assert Modelfile.read(path) == modelfile
    assert modelfile.template == "<|user|>\n{{ .Prompt }}\n<|assistant|>:\n{{ .Response }}<|endoftext|>"
    assert modelfile.create_parameters() == {
        "num_ctx": 256, "temperature": 0.6, "top_k": 20, "stop": ["<|endoftext|>", "<|im_end|>"]
    }  # fmt: skip
    assert frame_template("{{x}}", "", "") == '{{ "{{" }}x}}{{ .Prompt }}{{ .Response }}'
    path.write_text("FROM ./model.gguf\nPARAMETER mirostat 2\n")
    with pytest.raises(ModelfileError, match=rf"^{path}:2: unknown PARAMETER 'mirostat'"):
        Modelfile.read(path)
    path.write_text("TEMPLATE {{ .Prompt }}\n")
    with pytest.raises(ModelfileError, match=rf'^{path}:1: TEMPLATE expects text in """triple quotes"""'):
        Modelfile.read(path)


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_text_styles_become_chat_templates_that_render_the_training_prompt(tokenizer, style):
    from gptflow.tokenizer import GPT2Text

    before, after, end = prompt_frame(GPT2Text(tokenizer), style)
    assert end == "<|endoftext|>"
    template = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        frame_chat_template(before, after, end)
    )
    message = 'Quote "this" {{ and }} that\n\nok'
    rendered = template.render(messages=[{"role": "user", "content": message}], add_generation_prompt=True)
    assert rendered == format_prompt({"instruction": message, "input": ""}, style)
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert template.render(messages=turn) == format_prompt({"instruction": "a", "input": ""}, style) + "b" + end


def family_model(name: str, vocab_size: int):
    """A small transformers model of the family at its usual initialization (0.02), to be trained a little: a
    wider random init makes a tiny model chaotic, its logits moving far more than any real model's under 8-bit
    rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(sum(map(ord, name)))
    shape = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)  # fmt: skip
    if name == "qwen3":  # a head wider than emb/heads, as Qwen3's 128
        return Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=32, tie_word_embeddings=True))
    if name == "smollm":  # SmolLM's tied head
        return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    # Llama 3.2's frequency stretch, with an original context short enough to matter here; an untied head
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, rope_scaling=scaling))


def test_a_base_model_without_a_prompt_format_gets_a_plain_template(tokenizer):
    """A pretrained GPT-2 base has no prompt format: Ollama passes the prompt through and stops at its end token."""
    from gptflow.tokenizer import GPT2Text
    from model.gguf_export import ollama_modelfile

    text = GPT2Text(tokenizer)
    assert prompt_frame(text, None) is None
    modelfile = ollama_modelfile(text, None, 1024)
    assert modelfile.text() == (
        'FROM ./model.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|endoftext|>"\n'
        "PARAMETER num_ctx 1024\nPARAMETER temperature 0\n"
    )


def trained(model: GPTModel, tokenizer, steps: int = 40, rows: int = 8, length: int = 64) -> GPTModel:
    """`model` after `steps` of next-token training on `rows` x `length` tokens of the fixtures' corpus: a random
    model's greedy choices are near ties that any rounding flips; a little training gives it the margins a real
    model has."""
    ids = torch.tensor([tokenizer.encode(" ".join(corpus()))[: rows * length]]).view(rows, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _tiny_gpt2(path: Path, width: int = 64) -> Path:
    torch.manual_seed(0)
    model = GPTModel(tiny_config("gpt", emb_dim=width, n_heads=2, qkv_bias=False)).eval()
    return save_model(path, model, style="alpaca")


def test_tensor_types_follow_llama_cpp_s_converter():
    rows = lambda n, width: torch.zeros(n, width)  # noqa: E731
    assert tensor_type("blk.0.attn_qkv.weight", rows(144, 48), "q8_0", tied=True) == F16  # 48: not whole 32-blocks
    assert tensor_type("blk.0.ffn_down.weight", rows(48, 192), "q4_0", tied=True) == gguf.GGMLQuantizationType.Q4_0
    assert tensor_type("token_embd.weight", rows(512, 64), "q4_0", tied=True) == Q8_0  # the head: Q6_K in llama.cpp
    assert tensor_type("token_embd.weight", rows(512, 64), "q4_0", tied=False) == gguf.GGMLQuantizationType.Q4_0
    assert tensor_type("output.weight", rows(512, 64), "q4_0", tied=False) == Q8_0
    assert tensor_type("position_embd.weight", rows(128, 64), "q4_0", tied=True) == F32
    assert tensor_type("blk.0.attn_qkv.bias", torch.zeros(192), "f16", tied=True) == F32
    assert tensor_type("blk.0.attn_q_norm.weight", torch.zeros(32), "q8_0", tied=True) == F32
    assert tensor_type("blk.0.attn_q.weight", rows(64, 64), "f16", tied=True) == F16


# ------------------------------------------------------------------------------------------------ llama.cpp


@pytest.fixture(scope="module")
def exports(tmp_path_factory, mirror) -> dict[str, dict]:
    """Per family: our checkpoint (converted from transformers' files, with a prompt style recorded) and its GGUF
    bundles in f16, q8_0 and (but GPT-2, whose 50257-token files take seconds each to write and read) q4_0."""
    root = tmp_path_factory.mktemp("gguf")
    settings = load_settings(home=root / "home", mirror=mirror)
    out = {}
    for name, (tokenizer_style, style) in FAMILIES.items():
        if tokenizer_style == "gpt2":
            converted = _tiny_gpt2(root / name / "base.pt")
        else:
            folder = root / name
            vocab = write_tokenizer(root / f"{name}-tokenizer", tokenizer_style).vocab_size
            family_model(name, vocab).eval().save_pretrained(folder)
            write_tokenizer(folder, tokenizer_style)
            converted, _ = convert_hf(folder, settings)
        opened = open_model(converted, CHECKPOINT_LMS)
        # GPT-2's 50257-row head makes each step 30x dearer; its tiny model needs fewer to be decided
        steps, rows, length = (10, 4, 32) if tokenizer_style == "gpt2" else (40, 8, 64)
        model = trained(opened.language_model(settings), opened.tokenizer(settings), steps, rows, length)
        extra = {"tokenizer": opened.state["tokenizer"]} if opened.state.get("tokenizer") else {}
        checkpoint = save_model(root / name / "model.pt", model, **extra, **({"style": style} if style else {}))
        opened = open_model(checkpoint, CHECKPOINT_LMS)
        quants = ("f16", "q8_0") if tokenizer_style == "gpt2" else ("f16", "q8_0", "q4_0")  # Q4_0: the tied Llama's
        bundles = {
            quant: export_gguf(checkpoint, root / f"{name}-{quant}", ExportConfig(quant=quant), settings=settings)
            for quant in quants
        }
        out[name] = {
            "checkpoint": checkpoint,
            "settings": settings,
            "model": opened.language_model(settings),
            "tokenizer": opened.tokenizer(settings),
            "style": opened.style,
            "bundles": bundles,
        }
    return out


@pytest.mark.slow
def test_written_files_read_back_with_llama_cpp_s_names_and_types(exports):
    report = exports["gpt2"]["bundles"]["q8_0"]
    reader = gguf.GGUFReader(report["gguf"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_qkv.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["position_embd.weight"] == types["blk.0.attn_qkv.bias"] == types["output_norm.weight"] == "F32"
    assert "output.weight" not in types and len(types) == 4 + 2 * 12  # the tied head is token_embd
    qkv_bias = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.bias")
    assert not np.asarray(qkv_bias.data).any()  # our GPT-2 has no q/k/v bias; llama.cpp's needs one: zeros
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("gpt2.context_length") == 128 and field("gpt2.feed_forward_length") == 256
    tokens, kinds = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and kinds[50256] == 3 and kinds[0] == 1
    assert field("tokenizer.ggml.merges")[0] == "Ġ t" and field("tokenizer.ggml.eos_token_id") == 50256
    assert field("tokenizer.chat_template").startswith("{%- for message in messages -%}")
    modelfile = Modelfile.read(Path(report["bundle"]) / "Modelfile")
    assert modelfile.stops == ("<|endoftext|>",) and modelfile.parameters == {"num_ctx": 128, "temperature": 0}
    assert modelfile.template.startswith("Below is an instruction") and "{{ .Prompt }}" in modelfile.template
    manifest = json.loads((Path(report["bundle"]) / "manifest.json").read_text())
    assert manifest["kind"] == "gguf" and set(manifest["files"]) == {"model.gguf", "Modelfile", "card.md"}
    assert manifest["quant"] == "q8_0" and manifest["prompt_style"] == "alpaca"
    family = exports["gpt2"]
    again = export_gguf(family["checkpoint"], report["out_dir"], ExportConfig(), settings=family["settings"])
    assert again["reused"] and again["gguf"] == report["gguf"]

    q4 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exports["smollm"]["bundles"]["q4_0"]["gguf"]).tensors}
    assert q4["token_embd.weight"] == "Q8_0" and q4["blk.0.attn_q.weight"] == q4["blk.1.ffn_down.weight"] == "Q4_0"
    smollm = gguf.GGUFReader(exports["smollm"]["bundles"]["q8_0"]["gguf"])
    assert smollm.get_field("tokenizer.ggml.pre").contents() == "smollm"
    assert smollm.get_field("llama.attention.head_count_kv").contents() == 2


def _llama(llama_cpp, path: str, n_ctx: int = 256):
    return llama_cpp.Llama(path, logits_all=True, n_ctx=n_ctx, n_threads=2, seed=0, verbose=False)


def _ours(model: GPTModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def _theirs(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_f16_logits_equal_pytorch_within_1e_2(llama_cpp, exports, name):
    family = exports[name]
    llm = _llama(llama_cpp, family["bundles"]["f16"]["gguf"])
    worst = 0.0
    for prompt in PROMPTS:
        ids = family["tokenizer"].encode(prompt)
        worst = max(worst, float(np.abs(_theirs(llm, ids) - _ours(family["model"], ids)).max()))
    assert worst <= 1e-2, f"{name}: max |logit diff| {worst:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_q8_0_greedy_tokens_agree_with_ours(llama_cpp, exports, name):
    """At every position of our greedy continuation (32 tokens) llama.cpp's Q8_0 picks our token, teacher-forced:
    at least 95% over the prompts. Q4_0 loads and generates too, from a file under a third of f16's."""
    family = exports[name]
    model, tokenizer = family["model"], family["tokenizer"]
    llm = _llama(llama_cpp, family["bundles"]["q8_0"]["gguf"])
    same = total = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        expected = generate(model, torch.tensor([ids]), NEW_TOKENS)[0, len(ids) :].tolist()
        chosen = _theirs(llm, ids + expected[:-1])[len(ids) - 1 :].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(chosen, expected))
        total += len(expected)
    assert total == NEW_TOKENS * len(PROMPTS) and same / total >= 0.95, f"{name}: {same}/{total}"
    sizes = {q: Path(b["gguf"]).stat().st_size for q, b in family["bundles"].items()}
    assert sizes["q8_0"] < sizes["f16"]
    if "q4_0" in family["bundles"]:
        q4 = _llama(llama_cpp, family["bundles"]["q4_0"]["gguf"])
        q4.reset()
        tokens = [t for _, t in zip(range(8), q4.generate(tokenizer.encode(PROMPTS[0]), temp=0.0))]
        assert len(tokens) == 8 and sizes["q4_0"] < sizes["q8_0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_tokenizes_hard_strings_as_we_do(llama_cpp, exports, name):
    family = exports[name]
    llm = llama_cpp.Llama(family["bundles"]["q8_0"]["gguf"], vocab_only=True, verbose=False)
    for text in HARD:
        ours = family["tokenizer"].encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours, text
        assert llm.detokenize(ours, special=True).decode("utf-8") == text


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_chat_template_renders_the_prompt_we_train_on(llama_cpp, exports, name):
    """llama-cpp-python's own Jinja formatter, given the GGUF's template, writes the prompt our fine-tuning and
    `gptflow generate` use; the Modelfile's Go template frames the message the same way."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    family = exports[name]
    tokenizer, style = family["tokenizer"], family["style"]
    llm = llama_cpp.Llama(family["bundles"]["q8_0"]["gguf"], vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    bos = llm.metadata.get("tokenizer.ggml.bos_token_id")
    formatter = Jinja2ChatFormatter(
        template,
        eos_token=tokenizer.decode([tokenizer.eos_id]),
        bos_token=tokenizer.decode([int(bos)]) if bos is not None else "",
    )
    entry = {"instruction": "Name a color of the sea.", "input": ""}
    kwargs = CHAT_KWARGS if style == "chat" else {}
    rendered = formatter(messages=[{"role": "user", "content": entry["instruction"]}], **kwargs).prompt
    if style in ("alpaca", "phi3"):
        assert rendered == format_prompt(entry, style)
    elif style == "chat":
        assert rendered == chat_prompt(tokenizer, entry)
    else:
        assert rendered == tokenizer.render_chat([{"role": "user", "content": entry["instruction"]}])
    modelfile = Modelfile.read(Path(family["bundles"]["q8_0"]["bundle"]) / "Modelfile")
    before, after, _ = prompt_frame(tokenizer, style)
    assert modelfile.template.startswith(before + "{{ .Prompt }}" + after + "{{ .Response }}")
    assert before + entry["instruction"] + after == rendered


@pytest.mark.slow
def test_export_verb_writes_the_bundle_and_publish_puts_it_into_ollama(
    prefect_harness, settings, fake_ollama, tmp_path, capsys
):
    from cli import main

    checkpoint = _tiny_gpt2(tmp_path / "tiny" / "model.pt")
    assert main(["export", str(checkpoint), "--format", "gguf", "--quant", "f16"]) == 0
    out = capsys.readouterr().out
    bundle = next((settings.home / "export").glob("gguf-tiny-*/bundle"))
    assert f"wrote gpt2 GGUF (f16, {(bundle / 'model.gguf').stat().st_size / 1e6:.1f} MB" in out
    assert f"bundle: {bundle}" in out
    assert main(["publish", "tiny-alpaca", str(bundle), "--host", fake_ollama.host]) == 0
    assert main(["publish", "tiny-alpaca", str(bundle), "--host", fake_ollama.host]) == 0
    assert len(fake_ollama.requests_to(f"/api/blobs/sha256:{_sha256(bundle / 'model.gguf')}")) == 3  # HEAD, POST, HEAD
    create = fake_ollama.requests_to("/api/create")[-1].body
    assert create["parameters"] == {"num_ctx": 128, "temperature": 0, "stop": ["<|endoftext|>"]}
    assert create["template"] == Modelfile.read(bundle / "Modelfile").template


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
