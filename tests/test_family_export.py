"""The LM export for every family: tiny random Hugging Face models (Llama with Llama 3's rotary stretch and an untied
head, Qwen3 with q/k norms and a head wider than emb/heads, GPT-2's architecture with another vocabulary), each with
its locally trained tokenizer and chat template, converted with `load-hf` and exported with int8. The ONNX decoder
(rotary positions, grouped-query KV cache) is within 1e-4 of PyTorch, onnxruntime-genai (the family's model type)
generates our greedy tokens, and `python -m edge generate` answers as `gptflow generate` does with onnxruntime,
numpy and tokenizers only (tiktoken, jinja2 and torch blocked). About 35 s on 2 cores.

Then a classifier fine-tuned on each of those backbones exports to a classifier bundle that reads text with the
model's own tokenizer and pads with its pad id: fp32 ONNX within 1e-4 of PyTorch, the int8 gates, and `python -m
edge classify` from edge/ alone (tiktoken blocked) equal to PyTorch."""

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
from conftest import REPO_ROOT, standalone_edge_script
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

pytestmark = pytest.mark.slow  # every test exports ONNX graphs end to end (make test only)

FAMILIES = {"llama": "llama3", "qwen3": "qwen3", "gpt2-vocab": "chatml"}  # model -> tokenizer style
GENAI_TYPES = {"llama": "llama", "qwen3": "qwen3", "gpt2-vocab": "decoder"}
ENTRIES = [
    {"instruction": f"Name {i} colors of the sea.", "input": "" if i % 2 else "Be brief.", "output": f"Blue and {i}."}
    for i in range(8)
]
INSTRUCTION = "What does the river carry?"
NEW_TOKENS = 12

# Own-tokenizer bundles run on numpy, onnxruntime and tokenizers: tiktoken and jinja2 are blocked too.
STANDALONE = standalone_edge_script("tiktoken", "transformers", "jinja2")


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
    assert EdgeGenerator(bundle).text.render_chat("hi").endswith("<think>\n\n</think>\n\n")
    with pytest.raises(BundleError, match="holds no int8 model"):
        EdgeGenerator(bundle, int8=True)
    argv = [INSTRUCTION, "--input", "Be brief.", "--max-new-tokens", str(NEW_TOKENS)]
    assert edge_main(["generate", str(bundle), *argv]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", "--model", str(checkpoint), *argv]) == 0
    assert streamed == capsys.readouterr().out and streamed.strip()


# --- classifier bundles -----------------------------------------------------------------------------------------

# Each family's classifier reads a different hidden state, so the padding (the classifier's own pad id) is checked
# where it matters: `last_position` reads the padding itself.
POOLING = {"llama": "last_real", "qwen3": "last_position", "gpt2-vocab": "mean"}
TEXTS = ["the invoice payment was charged twice", "football match today, great goal", "garlic soup recipe"]
TEXTS += ["Order #123 costs $4.50, héllo wörld, refund please"]


@pytest.fixture(scope="module")
def classifiers(families, tmp_path_factory, mirror) -> dict[str, dict]:
    """Per family: a 3-topic classifier fine-tuned from the converted model (its tokenizer kept in best.pt) and
    exported with int8 by `export_classifier`, given no GPT-2 tokenizer (none is needed)."""
    from classify_data import write_splits

    from model.configs import ClassifierConfig
    from model.finetune_classifier import finetune
    from model.onnx_export import export_classifier

    root = tmp_path_factory.mktemp("family-classifiers")
    settings = load_settings(home=root / "home", mirror=mirror)
    data = write_splits(root / "data", (20, 5, 34))  # 60 train, 15 validation, 102 test texts
    out = {}
    for name, family in families.items():
        config = ClassifierConfig(
            init=f"checkpoint:{family['checkpoint']}", trainable="all", lr=2e-3, epochs=5, batch_size=8,
            patience=None, keep="last", pooling=POOLING[name], max_length=48,
        )  # fmt: skip
        tuned = finetune(data, root / f"classify-{name}", config, settings=settings)
        report = export_classifier(tuned.best, data, root / f"export-{name}", ExportConfig(), settings=settings)
        out[name] = {"best": tuned.best, "data": data, "report": report, "bundle": Path(report["bundle"])}
    return out


def _torch_probs(best: Path, texts: list[str]) -> np.ndarray:
    from edge.text import encode_texts, softmax
    from model.classifier import predict_logits
    from model.files import CLASSIFIERS

    loaded = open_model(best, CLASSIFIERS).classifier()
    return softmax(predict_logits(loaded.model, encode_texts(loaded.tokenizer(), texts, loaded.max_length)))


@pytest.mark.parametrize("name", FAMILIES)
def test_classifier_bundle_parity_int8_gate_and_its_tokenizer(classifiers, families, name, capsys):
    """The export reads the test split with the classifier's own tokenizer and pads with its pad id: fp32 ONNX within
    1e-4 of PyTorch on all 102 texts, the int8 gates pass, and the bundle carries the model's tokenizer files as the
    LM bundle does (manifest `tokenizer: "hf"`, `tokenizer_files`). The edge runtime encodes as training did; the
    champion scoring reads the bundle the same way."""
    from edge.runtime import EdgeClassifier
    from edge.text import encode_texts, softmax
    from eval.champion import score_classifier_bundle
    from model.checkpoint import load_checkpoint
    from model.files import CLASSIFIERS

    clf = classifiers[name]
    report, bundle = clf["report"], clf["bundle"]
    parity = report["parity"]
    assert parity["n"] == parity["fp32_prediction_matches"] == 102 and parity["fp32_max_abs_logit_diff"] <= 1e-4
    assert parity["int8_agreement"] >= 0.99 and report["int8_drop_points"] <= 1.0
    assert report["accuracy"]["torch_fp32"] == report["accuracy"]["onnx_fp32"] > 0.9  # the classifier learned
    best = load_checkpoint(clf["best"])
    manifest = verify_bundle(bundle, "classifier")
    tokenizer_files = ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert manifest["tokenizer"] == "hf" and manifest["tokenizer_files"] == tokenizer_files
    assert set(manifest["files"]) == {"model.onnx", "model.int8.onnx", "labels.json", "card.md", *tokenizer_files}
    assert manifest["pad_id"] == best["pad_id"] == HFTokenizer.from_folder(families[name]["folder"]).pad_id
    assert manifest["pooling"] == POOLING[name]
    for file in tokenizer_files:
        assert (bundle / file).read_text() == best["tokenizer"][file]
    meta = {p.key: p.value for p in onnx.load(bundle / "model.onnx").metadata_props}
    assert (meta["tokenizer"], meta["pad_id"]) == ("hf", str(best["pad_id"]))

    texts = TEXTS + [""]
    loaded = open_model(clf["best"], CLASSIFIERS).classifier()
    edge = EdgeClassifier(bundle)
    assert edge.encode(texts) == encode_texts(loaded.tokenizer(), texts, loaded.max_length)
    diff = float(np.abs(softmax(edge.logits(texts)) - _torch_probs(clf["best"], texts)).max())
    int8 = EdgeClassifier(bundle, int8=True).predict(texts)
    with capsys.disabled():  # the measured numbers, in the log of a `-s` run
        print(f"\n{name}: max |prob diff| {diff:.2e}; parity {parity}; accuracy {report['accuracy']}", end=" ")
    assert diff <= 1e-4
    assert [label for label, _ in int8] == [label for label, _ in edge.predict(texts)]
    score = score_classifier_bundle(bundle, clf["data"])
    assert score["model"] == "int8" and score["accuracy"] == pytest.approx(report["accuracy"]["onnx_int8"])


@pytest.mark.parametrize("name", FAMILIES)
def test_edge_classify_alone_equals_pytorch_and_gptflow_classify(classifiers, name, tmp_path, settings, capsys):
    """`python -m edge classify` from a copy of edge/ alone (torch and tiktoken blocked: the bundle's tokenizer is
    read with tokenizers) gives PyTorch's labels and probabilities; `gptflow classify --model BUNDLE` prints the same
    lines, and `--int8` the same labels."""
    clf = classifiers[name]
    shutil.copytree(REPO_ROOT / "edge", tmp_path / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(clf["bundle"], tmp_path / "bundle")
    outputs = {}
    for extra in ([], ["--int8"]):
        args = [str(tmp_path), sysconfig.get_paths()["purelib"], "classify", "bundle", *TEXTS, *extra]
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", STANDALONE, *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        outputs[tuple(extra)] = proc.stdout
        assert main(["classify", *TEXTS, "--model", str(clf["bundle"]), *extra]) == 0
        assert capsys.readouterr().out == proc.stdout
    lines = [line.split("\t") for line in outputs[()].splitlines()]
    probs = _torch_probs(clf["best"], TEXTS)
    labels = json.loads((clf["bundle"] / "labels.json").read_text())
    names = sorted(labels, key=labels.get)
    assert [line[2] for line in lines] == TEXTS
    assert [line[0] for line in lines] == [names[k] for k in probs.argmax(1)]
    assert np.allclose([float(line[1]) for line in lines], probs.max(1), atol=1e-4 + 5e-5)  # printed to 4 places
    int8 = [line.split("\t")[0] for line in outputs[("--int8",)].splitlines()]
    assert int8 == [line[0] for line in lines]
    assert main(["classify", *TEXTS, "--model", str(clf["best"])]) == 0  # the checkpoint, read with PyTorch
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == int8


def test_a_classifier_whose_tokenizer_does_not_fit_its_weights_is_one_clear_error(classifiers, tokenizer, tmp_path):
    """The bug's shape: a Qwen3 classifier's texts read with GPT-2's BPE give ids beyond its vocabulary. Before: an
    IndexError deep in the embedding; now the export says what is wrong before anything is written."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.onnx_export import export_classifier

    state = load_checkpoint(classifiers["qwen3"]["best"])
    del state["tokenizer"]
    broken = save_checkpoint(tmp_path / "no-tokenizer.pt", **state)
    files = ("unused", "unused")
    with pytest.raises(ExportError, match=r"ids \[.*\] outside the model's vocabulary of \d+"):
        export_classifier(
            broken, classifiers["qwen3"]["data"], tmp_path / "x", ExportConfig(), tokenizer=tokenizer,
            tokenizer_files=files,
        )  # fmt: skip


def test_an_ensemble_exports_with_its_members_tokenizer_and_refuses_two_vocabularies(classifiers, tmp_path):
    """Members sharing one tokenizer (the Llama classifier twice) export as one graph that reads text with it;
    members of different vocabularies are refused in one line when the ensemble is built."""
    from model.classifier import ClassifierError
    from model.finetune_classifier import build_ensemble
    from model.onnx_export import export_classifier

    data, llama = classifiers["llama"]["data"], classifiers["llama"]["best"]
    metrics = {"test": {"accuracy": classifiers["llama"]["report"]["accuracy"]["torch_fp32"]}}
    with pytest.raises(ClassifierError, match="reads text with another tokenizer") as caught:
        build_ensemble(data, [{"best": llama}, {"best": classifiers["qwen3"]["best"]}], tmp_path / "mixed")
    assert len(str(caught.value).splitlines()) == 1
    built = build_ensemble(data, [{"best": llama, "metrics": metrics}] * 2, tmp_path / "ensemble")
    report = export_classifier(built.best, data, tmp_path / "export", ExportConfig(int8=False))
    manifest = verify_bundle(report["bundle"], "classifier")
    assert manifest["tokenizer"] == "hf" and len(manifest["members"]) == 2
    assert report["parity"]["fp32_max_abs_logit_diff"] <= 1e-4 and report["parity"]["fp32_prediction_matches"] == 102
    assert report["accuracy"]["onnx_fp32"] == classifiers["llama"]["report"]["accuracy"]["onnx_fp32"]
