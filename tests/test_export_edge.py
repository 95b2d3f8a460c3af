"""ONNX export, parity, int8 gate, the edge bundle and its torch-free runtime, and the classify/export CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import onnx
import pytest
import torch
from classify_data import make_texts
from conftest import REPO_ROOT, standalone_edge_script, tiny_config

from edge import BundleError
from edge.runtime import EdgeClassifier, verify_bundle
from edge.text import encode_texts, pad_batch, softmax
from gptflow.storage import sha256_file
from model.classifier import SequenceClassifier, predict_logits
from model.files import CLASSIFIERS
from model.gpt import GPTModel
from model.onnx_export import ExportError, check_parity, export_onnx, onnx_logits
from model.opener import open_model
from model.quantize import QuantizationGateError, check_accuracy_gate, quantize_torch_dynamic

TEXTS = ["the invoice payment was charged twice", "football match today, great goal", "", "garlic soup recipe"]


@pytest.fixture(scope="module")
def exported(topic_classifier):
    """The session's tiny topic classifier (tests/conftest.py): trained on 60 texts, exported with int8."""
    return topic_classifier


@pytest.mark.slow
def test_export_report_parity_and_int8(exported):
    report = exported["report"]
    assert report["parity"]["n"] == 102 and report["parity"]["fp32_prediction_matches"] == 102
    assert report["parity"]["fp32_max_abs_logit_diff"] <= 1e-4
    assert report["parity"]["int8_agreement"] >= 0.99
    assert report["accuracy"]["torch_fp32"] == report["accuracy"]["onnx_fp32"] > 0.9  # the model learned
    assert report["opset"] >= 17
    assert report["sizes_bytes"]["model.int8.onnx"] * 3 < report["sizes_bytes"]["model.onnx"]


@pytest.mark.slow
def test_onnx_graph_io_checker_and_metadata(exported):
    path = exported["bundle"] / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(path)
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for t in inputs.values():
        assert t.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in t.shape.dim] == ["batch", "seq"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["labels"]) == {"billing": 0, "food": 1, "sport": 2}
    assert (meta["tokenizer"], meta["max_length"], meta["pad_id"]) == ("gpt2", "128", "50256")
    assert meta["source_checkpoint_sha256"] == sha256_file(exported["best"])
    assert int(meta["opset"]) >= 17


@pytest.mark.slow
def test_dynamic_axes_match_torch(exported):
    loaded = open_model(exported["best"], CLASSIFIERS).classifier()
    edge = EdgeClassifier(exported["bundle"])
    for rows in ([[42]], [list(range(1, 128))], [[5, 6, 7]] * 3 + [list(range(100, 150))]):
        ids, mask = pad_batch(rows)
        ort_logits = edge.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            ref = loaded.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        assert ort_logits.shape == (len(rows), 3)
        assert np.abs(ort_logits - ref).max() <= 1e-4


@pytest.mark.slow
def test_bundle_manifest_lists_every_file(exported):
    bundle = exported["bundle"]
    manifest = verify_bundle(bundle)
    names = {"model.onnx", "model.int8.onnx", "encoder.json", "vocab.bpe", "labels.json", "card.md"}
    assert set(manifest["files"]) == names
    assert all(manifest["files"][n] == sha256_file(bundle / n) for n in names)
    # A classifier of GPT-2's vocabulary: the manifest (and card) of bundles written before other vocabularies
    # existed, field for field, so that registry entries and their comparisons stay valid.
    assert list(manifest) == [
        "format", "kind", "files", "labels", "max_length", "pad_id", "tokenizer", "pooling",
        "source_checkpoint_sha256", "opset", "test_accuracy",
    ]  # fmt: skip
    assert (manifest["tokenizer"], manifest["pad_id"]) == ("gpt2", 50256)
    assert "on a GPT-2 architecture backbone (" in (bundle / "card.md").read_text()


@pytest.mark.slow
def test_tampered_bundle_is_refused(exported, tmp_path, settings, capsys):
    from cli import main

    bundle = shutil.copytree(exported["bundle"], tmp_path / "bundle")
    with open(bundle / "model.int8.onnx", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\x00" * 4)
    with pytest.raises(BundleError, match="model.int8.onnx does not match its sha256"):
        EdgeClassifier(bundle, int8=True)
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "classify", str(bundle), "hi"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert proc.returncode == 2 and "refusing the bundle" in proc.stderr
    assert main(["classify", "hi", "--model", str(bundle), "--int8"]) == 2  # the CLI prints it as one line too
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    (bundle / "model.int8.onnx").unlink()
    with pytest.raises(BundleError, match="model.int8.onnx is missing"):
        verify_bundle(bundle)


STANDALONE = standalone_edge_script("filelock")  # numpy, onnxruntime and tiktoken only


def classify_with_edge_alone(bundle, texts: list[str], int8: bool, tmp_path) -> list[list[str]]:
    """`python -m edge classify` run from a copy of edge/ beside a copy of `bundle`, with only numpy, onnxruntime
    and tiktoken importable: its output lines split into (label, probability, text)."""
    shutil.copytree(REPO_ROOT / "edge", tmp_path / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(bundle, tmp_path / "bundle")
    args = [str(tmp_path), sysconfig.get_paths()["purelib"], "classify", "bundle", *texts] + (
        ["--int8"] if int8 else []
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", STANDALONE, *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.slow
def test_edge_folder_alone_matches_pytorch(exported, tokenizer, tmp_path, int8):
    """edge/ copied alone beside a bundle runs with only numpy, onnxruntime and tiktoken importable."""
    texts = TEXTS + make_texts(4, seed=9)["text"].tolist()
    lines = classify_with_edge_alone(exported["bundle"], texts, int8, tmp_path)
    loaded = open_model(exported["best"], CLASSIFIERS).classifier()
    model = quantize_torch_dynamic(loaded.model) if int8 else loaded.model
    probs = softmax(predict_logits(model, encode_texts(tokenizer, texts, loaded.max_length)))
    assert [line[0] for line in lines] == [loaded.names[k] for k in probs.argmax(1)]
    tol = 0.05 if int8 else 1e-4  # torch int8 and onnxruntime int8 use different kernels
    assert np.allclose([float(line[1]) for line in lines], probs.max(1), atol=tol)
    assert [line[2] if len(line) > 2 else "" for line in lines] == texts


def test_parity_and_gate_fail_loudly():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    with pytest.raises(ExportError, match="max \\|logit diff\\| 0.001"):
        check_parity(ref, ref + np.float32(1e-3), None, "t")
    with pytest.raises(ExportError, match="agree with fp32 on 50.00%"):
        check_parity(ref, ref, np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32), "t")
    assert check_accuracy_gate(0.98, 0.975, 1.0, "t") == pytest.approx(0.5)
    with pytest.raises(QuantizationGateError, match="1.50 points below fp32 98.00%"):
        check_accuracy_gate(0.98, 0.965, 1.0, "t")


@pytest.mark.slow
def test_classify_cli_checkpoint_and_bundle(exported, settings, tmp_path, capsys):
    from cli import main

    texts_file = tmp_path / "msgs.csv"
    texts_file.write_text('text\n"football match today, great goal"\ngarlic soup recipe\n')
    outputs = []
    for model, extra in ((exported["best"], []), (exported["bundle"], ["--int8"])):
        assert main(["classify", TEXTS[0], "--model", str(model), "--file", str(texts_file), *extra]) == 0
        outputs.append([line.split("\t")[0] for line in capsys.readouterr().out.splitlines()])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify", "hi", "--model", "nowhere.pt"], "does not exist"),
        (["classify", "--model", "x"], "nothing to classify"),
        (["export", "nowhere.pt"], "does not exist"),
        (["finetune-classifier", "--data", "missing.csv"], "--data: missing.csv"),
        (["finetune-classifier", "--data", "spam", "--init", "bogus"], "--init"),
        (["finetune-classifier", "--preset", "huge"], "unknown model preset"),
        (["finetune-classifier", "--epochs", "0"], "--epochs"),
    ],
)
def test_cli_bad_input_exits_2(argv, message, settings, capsys):
    from cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_mean_pooling_exports_with_dynamic_axes(tmp_path):
    torch.manual_seed(0)
    model = SequenceClassifier(GPTModel(tiny_config("gpt")), 2, "mean").eval()
    path = export_onnx(model, tmp_path / "mean.onnx", {"pooling": "mean"})
    rows = [[5, 6, 7], list(range(100, 140)), [42]]
    assert np.abs(onnx_logits(path, rows) - predict_logits(model, rows)).max() <= 1e-4


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("labels"), "'labels' must map each class name to an id 0..n-1, got None"),
        (lambda m: m.update(labels={"ham": 0, "spam": 2}), "'labels' must map each class name to an id 0..n-1"),
        (lambda m: m.update(labels={"ham": "0", "spam": 1}), "'labels' must map each class name to an id 0..n-1"),
        (lambda m: m.update(files=sorted(m["files"])), "'files' must map each file name to its sha256"),
        (lambda m: m.pop("files"), "'files' must map each file name to its sha256"),
        (lambda m: m.update(max_length="128"), "'max_length' must be a positive integer, got '128'"),
        (
            lambda m: m.update(tokenizer="hf"),
            "'tokenizer' must be \"gpt2\", or \"hf\" with 'tokenizer_files' listing tokenizer.json; got tokenizer "
            "'hf', tokenizer_files None",
        ),
        # before: "missing", though the file exists
        (lambda m: m["files"].update({"../bundle/card.md": "0" * 64}), "file '../bundle/card.md' points outside"),
        (lambda m: m["files"].update({"/etc/hostname": "0" * 64}), "file '/etc/hostname' points outside the bundle"),
    ],
)
@pytest.mark.slow
def test_a_malformed_manifest_is_one_line(exported, tmp_path, edit, message):
    bundle = shutil.copytree(exported["bundle"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re.escape(f"{bundle / 'manifest.json'}: {message}")):
        EdgeClassifier(bundle)
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "classify", str(bundle), "hi"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr
