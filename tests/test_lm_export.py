"""The language model to the edge: the ONNX decoder with a KV cache, int8 and its gate, the LM bundle,
`python -m edge generate` with onnxruntime alone, and the export / generate CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO_ROOT, tiny_config, write_random_tokens
from test_export_edge import STANDALONE

from cli import main
from edge import BundleError
from edge.lm import Decoder, EdgeGenerator, PromptTemplate
from edge.runtime import verify_bundle
from gptflow.prompts import format_prompt
from gptflow.settings import load_settings
from gptflow.tokenizer import tokenizer_files
from model.checkpoint import CheckpointError, load_checkpoint, save_model
from model.configs import ExportConfig
from model.files import CHECKPOINT_LMS
from model.generate import generate
from model.gpt import GPTModel
from model.instruct import finetune
from model.lm_export import export_lm, prompt_template
from model.opener import open_model
from model.quantize import check_perplexity_gate

ENTRIES = [
    {
        "instruction": f"What is {i} plus one?",
        "input": "" if i % 2 else f"Number: {i}",
        "output": f"The answer is {i + 1}.",
    }
    for i in range(24)
]
INSTRUCTIONS = ["What is 3 plus one?", "What is 17 plus one?", "Name a color."]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tokenizer, mirror):
    """A tiny instruction model trained for a few steps, exported with int8."""
    root = tmp_path_factory.mktemp("lm")
    data = root / "data"
    data.mkdir()
    for name, part in {"train": ENTRIES[:12], "validation": ENTRIES[12:18], "test": ENTRIES[18:]}.items():
        (data / f"{name}.json").write_text(json.dumps(part))
    config = tiny_config("instruct", batch_size=4, lr=5e-3, epochs=6, eval_every=100, max_new_tokens=8)
    model_path = finetune(data, root / "instruct", config, tokenizer=tokenizer).model_path
    files = tokenizer_files(load_settings(mirror=mirror))
    report = export_lm(model_path, data, root / "export", ExportConfig(), tokenizer=tokenizer, tokenizer_files=files)
    return {"root": root, "data": data, "model": model_path, "report": report, "bundle": root / "export" / "bundle"}


@pytest.mark.slow
def test_report_parity_perplexity_and_agreement(lm):
    q = lm["report"]["quality"]
    assert q["parity"]["steps"] == 32
    assert q["parity"]["prompt_max_abs_logit_diff"] <= 1e-4 and q["parity"]["steps_max_abs_logit_diff"] <= 1e-4
    ppl = q["perplexity"]
    assert ppl["onnx_fp32"] == pytest.approx(ppl["torch_fp32"], rel=1e-5)
    assert ppl["onnx_fp32"] < 200  # trained: far below the vocabulary's 50257
    assert q["int8_perplexity_increase_pct"] == pytest.approx(100 * (ppl["onnx_int8"] / ppl["onnx_fp32"] - 1))
    assert abs(q["int8_perplexity_increase_pct"]) <= 3.0
    agreement = q["int8_agreement"]
    assert agreement["tokens"] == 6 * 32 and agreement["token_agreement"] >= 0.9
    sizes = lm["report"]["sizes_bytes"]
    assert sizes["model.int8.onnx"] < 0.3 * sizes["model.onnx"]
    card = (lm["bundle"] / "card.md").read_text()
    assert "greedy-token agreement" in card and f"{ppl['onnx_int8']:.4f}" in card


@pytest.mark.slow
def test_decoder_graph_io_and_tied_head_stored_once(lm):
    cfg = open_model(lm["model"], CHECKPOINT_LMS).config
    proto = onnx.load(lm["bundle"] / "model.onnx")
    names = [i.name for i in proto.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:7] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert [o.name for o in proto.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", cfg.n_heads, "past_sequence_length", cfg.head_dim]
    big = [t for t in proto.graph.initializer if np.prod(t.dims) == cfg.vocab_size * cfg.emb_dim]
    assert len(big) == 1  # the embedding and the tied LM head share one matrix
    int8 = onnx.load(lm["bundle"] / "model.int8.onnx")
    assert not [t for t in int8.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 3e6]
    ops = {n.op_type for n in int8.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops


def _prompt_ids(tokenizer, instruction: str) -> list[int]:
    return tokenizer.encode(format_prompt({"instruction": instruction, "input": ""}, "alpaca"))


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.slow
def test_greedy_tokens_equal_pytorch(lm, tokenizer, use_cache):
    model = open_model(lm["model"], CHECKPOINT_LMS).language_model().eval()
    edge = EdgeGenerator(lm["bundle"])
    for instruction in INSTRUCTIONS:
        ids = _prompt_ids(tokenizer, instruction)
        expected = generate(model, torch.tensor([ids]), 24, use_cache=use_cache)[0, len(ids) :].tolist()
        assert edge.decoder.generate([ids], 24, eos_id=None, use_cache=use_cache)[0] == expected


@pytest.mark.slow
def test_left_padded_batch_equals_each_prompt_alone(lm, tokenizer):
    decoder = Decoder(lm["bundle"] / "model.onnx", 128)
    prompts = [_prompt_ids(tokenizer, i) for i in INSTRUCTIONS] + [[15496, 11, 995]]
    assert len({len(p) for p in prompts}) > 1
    alone = [decoder.generate([p], 16, eos_id=None)[0] for p in prompts]
    assert decoder.generate(prompts, 16, eos_id=None) == alone
    model = (
        open_model(lm["model"], CHECKPOINT_LMS).language_model().eval()
    )  # and PyTorch's batch does the same with the same rule
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[50256] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert generate(model, ids, 16, attention_mask=mask)[:, width:].tolist() == alone


@pytest.mark.slow
def test_int8_generation_with_and_without_cache_is_equal(lm):
    decoder = Decoder(lm["bundle"] / "model.int8.onnx", 128)
    test = json.loads((lm["data"] / "test.json").read_text())
    generator = EdgeGenerator(lm["bundle"], int8=True)
    for entry in test:
        ids = generator.encode(generator.template.format(entry["instruction"], entry["input"]))
        cached = decoder.generate([ids], 32, eos_id=None)
        assert cached == decoder.generate([ids], 32, eos_id=None, use_cache=False)


@pytest.mark.slow
def test_bundle_files_hashes_and_template(lm):
    manifest = verify_bundle(lm["bundle"], "lm")
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.int8.onnx",
        "encoder.json",
        "vocab.bpe",
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "card.md",
    }
    assert manifest["model"]["context_length"] == 128 and manifest["eos_id"] == 50256
    template = PromptTemplate(manifest["prompt"])
    entry = {"instruction": "Add {x} and }{ braces", "input": "a {b}"}
    assert template.format(entry["instruction"], entry["input"]) == format_prompt(entry, "alpaca")
    assert template.format("Say hi") == format_prompt({"instruction": "Say hi", "input": ""}, "alpaca")
    assert prompt_template("phi3")["with_input"].format(instruction="i", input="x") == format_prompt(
        {"instruction": "i", "input": "x"}, "phi3"
    )


@pytest.mark.slow
def test_edge_generate_alone_without_torch_equals_gptflow_generate(lm, tmp_path, settings, capsys):
    """edge/ copied alone beside the bundle streams the same answer as `gptflow generate` on the checkpoint."""
    shutil.copytree(REPO_ROOT / "edge", tmp_path / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(lm["bundle"], tmp_path / "bundle")
    for instruction, extra in ((INSTRUCTIONS[0], []), (INSTRUCTIONS[1], ["--input", "Number: 17"])):
        args = [str(tmp_path), sysconfig.get_paths()["purelib"], "generate", "bundle", instruction]
        args += ["--max-new-tokens", "20", *extra]
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", STANDALONE, *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        assert main(["generate", instruction, "--model", str(lm["model"]), "--max-new-tokens", "20", *extra]) == 0
        expected = capsys.readouterr().out
        assert proc.stdout == expected and expected.strip()


@pytest.mark.slow
def test_edge_generate_streams_batches_and_truncates(lm, settings, capsys):
    from edge.__main__ import main as edge_main

    bundle = str(lm["bundle"])
    streamed: list[str] = []
    answer = EdgeGenerator(bundle).generate(
        [PromptTemplate(verify_bundle(bundle)["prompt"]).format(INSTRUCTIONS[0])],
        12,
        on_text=lambda row, piece: streamed.append(piece),
    )[0]
    assert len(streamed) > 1 and "".join(streamed) == answer
    assert edge_main(["generate", bundle, *INSTRUCTIONS[:2], "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"### {INSTRUCTIONS[0]}\n{answer}\n### {INSTRUCTIONS[1]}\n")
    long = "word " * 200
    assert edge_main(["generate", bundle, long, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the model's context is 128" in err and "--truncate" in err
    assert edge_main(["generate", bundle, long, "--max-new-tokens", "2", "--truncate", "--raw"]) == 0
    assert main(["generate", long, "--model", str(lm["model"]), "--max-new-tokens", "2"]) == 2
    assert "the model's context is 128" in capsys.readouterr().err


@pytest.mark.slow
def test_tampered_and_wrong_kind_bundles_are_refused(lm, tmp_path, capsys):
    from edge.__main__ import main as edge_main

    bundle = shutil.copytree(lm["bundle"], tmp_path / "bundle")
    with open(bundle / "model.onnx", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x01" * 4)
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        EdgeGenerator(bundle)
    assert edge_main(["generate", str(bundle), "hi"]) == 2
    assert "refusing the bundle" in capsys.readouterr().err
    assert edge_main(["classify", str(lm["bundle"]), "hi"]) == 2
    assert "is a language-model bundle, not classifier" in capsys.readouterr().err
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "manifest.json").write_text(json.dumps({"format": "gptflow-edge-bundle/1", "files": {}}))
    with pytest.raises(BundleError, match="is a classifier bundle, not lm; run it with `python -m edge classify"):
        EdgeGenerator(classifier)


def test_perplexity_gate_fails_loudly():
    assert check_perplexity_gate(10.0, 10.2, 3.0, "t") == pytest.approx(2.0)
    with pytest.raises(Exception, match="perplexity 10.500 is 5.00% above fp32 10.000"):
        check_perplexity_gate(10.0, 10.5, 3.0, "t")


@pytest.mark.slow
def test_wrong_checkpoint_kinds_are_refused(prefect_harness, lm, tmp_path, tokenizer, mirror, settings, capsys):
    files = tokenizer_files(load_settings(mirror=mirror))
    classifier_like = tmp_path / "best.pt"
    torch.save(
        {"format": "gptflow-classifier/1", "config": {"emb_dim": 8, "n_layers": 1, "n_heads": 1}}, classifier_like
    )
    with pytest.raises(CheckpointError, match="is a classifier checkpoint, not a language-model checkpoint; a classif"):
        export_lm(classifier_like, lm["data"], None, ExportConfig(), tokenizer=tokenizer, tokenizer_files=files)
    assert main(["export", str(classifier_like), "--format", "hf"]) == 2
    assert "is not a language-model checkpoint: --format hf" in capsys.readouterr().err
    torch.save({"format": "gptflow-classifier/1", "config": {"emb_dim": 8}}, classifier_like)
    assert main(["export", str(classifier_like)]) == 2
    assert f"{classifier_like}: invalid model config: n_layers: Field required" in capsys.readouterr().err
    assert main(["export", str(lm["model"]), "--data", str(tmp_path)]) == 2
    assert "expected an instructions data folder" in capsys.readouterr().err


@pytest.mark.slow
def test_export_cli_lm_bundle_and_hf_folder(prefect_harness, lm, tmp_path, settings, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf-export"
    assert main(["export", str(lm["model"]), "--format", "hf", "--out", str(out)]) == 0
    assert f"Hugging Face GPT2LMHeadModel folder: {out / 'hf'}" in capsys.readouterr().out
    hf = transformers.GPT2LMHeadModel.from_pretrained(out / "hf").eval()
    model = open_model(lm["model"], CHECKPOINT_LMS).language_model().eval()
    ids = torch.tensor([[15496, 11, 995, 318, 257], [40, 588, 257, 3797, 13]])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
    assert load_checkpoint(lm["model"])["style"] == "alpaca"
    out = tmp_path / "lm-export"
    argv = ["export", str(lm["model"]), "--data", str(lm["data"]), "--out", str(out), "--max-eval-rows", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "parity: max |logit diff| prompt pass" in printed and f"python -m edge generate {out / 'bundle'}" in printed
    assert verify_bundle(out / "bundle", "lm")["prompt"]["style"] == "alpaca"


@pytest.mark.slow
def test_onnxruntime_genai_runs_the_bundle_with_our_greedy_tokens(lm, tokenizer):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(lm["bundle"]))
    decoder = EdgeGenerator(lm["bundle"]).decoder
    for instruction in INSTRUCTIONS:
        ids = _prompt_ids(tokenizer, instruction)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 16)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        ours = decoder.generate([ids], 16)[0]  # both stop at end-of-text, which they keep
        assert tokens == ours
    assert og.Tokenizer(model).encode("Hello, world").tolist() == [15496, 11, 995]


@pytest.mark.slow
def test_pretrained_model_exports_on_a_corpus_without_template(tmp_path, tokenizer, mirror):
    """A base model (no prompt style) is measured on a corpus folder's val.bin; its bundle uses plain prompts."""
    torch.manual_seed(3)
    model = GPTModel(tiny_config("gpt"))
    checkpoint = save_model(tmp_path / "base" / "model.pt", model)
    corpus = write_random_tokens(tmp_path / "corpus", 300, 129 * 3, seed=4)
    files = tokenizer_files(load_settings(mirror=mirror))
    config = ExportConfig(int8=False, max_eval_rows=2)
    report = export_lm(checkpoint, corpus, tmp_path / "export", config, tokenizer=tokenizer, tokenizer_files=files)
    assert report["quality"]["perplexity_rows"] == 2 and "int8_agreement" not in report["quality"]
    manifest = verify_bundle(tmp_path / "export" / "bundle", "lm")
    assert manifest["prompt"] is None and "model.int8.onnx" not in manifest["files"]
    generator = EdgeGenerator(tmp_path / "export" / "bundle")
    ids = tokenizer.encode("Hello, world")
    expected = generate(model.eval(), torch.tensor([ids]), 8, eos_id=50256)[0, len(ids) :].tolist()
    assert generator.decoder.generate([ids], 8)[0] == expected
    assert generator.template.format("Hello, world") == "Hello, world"
    again = export_lm(checkpoint, corpus, tmp_path / "export", config, tokenizer=tokenizer, tokenizer_files=files)
    assert again["reused"] and again["quality"] == report["quality"]


def test_each_bundle_kind_is_keyed_by_its_own_export_fields():
    base, changed = ExportConfig(), ExportConfig(max_ppl_increase=5.0, max_int8_drop=2.0)
    assert base.identity("classifier") == ExportConfig(max_ppl_increase=5.0).identity("classifier")
    assert base.identity("lm") == ExportConfig(max_int8_drop=2.0).identity("lm")
    assert base.identity("lm") != changed.identity("lm") and base.identity("classifier") != changed.identity(
        "classifier"
    )
    keyed = set(base.identity("classifier")) | set(base.identity("lm"))
    # a new field lands in a key; `quant` keys the GGUF stage (model.gguf_export), `format` picks the stage
    assert keyed | {"device", "format", "quant"} == set(ExportConfig.model_fields)
