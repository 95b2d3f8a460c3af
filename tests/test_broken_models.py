"""Nothing broken passes: NaN or infinite weights and outputs fail every gate, load and verb, and a stage's file that
changed after its manifest was written is refused where a verb reads it."""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import write_random_tokens
from onnx import numpy_helper

from cli import main
from edge import NonFiniteOutputError
from edge.runtime import EdgeClassifier
from eval.champion import PromotionRule, decide
from gptflow.settings import load_settings
from gptflow.stage import StageError
from gptflow.storage import read_json, sha256_file, write_json_atomic
from gptflow.tokenizer import tokenizer_files
from model.checkpoint import load_checkpoint, save_checkpoint, save_model
from model.config import GPTConfig
from model.configs import ExportConfig
from model.files import CLASSIFIERS, LANGUAGE_MODELS, CheckpointError
from model.generate import NonFiniteLogitsError, generate
from model.gpt import GPTModel
from model.onnx_export import ExportError, check_parity, export_classifier
from model.opener import open_model
from model.quantize import QuantizationGateError, check_accuracy_gate, check_perplexity_gate

NAN, INF = float("nan"), float("inf")
REF = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_the_export_gates_fail_on_non_finite_values(bad):
    broken = REF.copy()
    broken[0, 1] = bad
    # Before: |diff| NaN is not > atol, and argmax of [1, nan] equals argmax of [1, 0]: the NaN model passed.
    with pytest.raises(ExportError, match="the fp32 ONNX model gives NaN or infinite logits for 1 of 2 messages"):
        check_parity(REF, broken, None, "t")
    with pytest.raises(ExportError, match="the int8 ONNX model gives NaN or infinite logits for 1 of 2"):
        check_parity(REF, REF, broken, "t")
    with pytest.raises(QuantizationGateError, match="int8 test accuracy"):
        check_accuracy_gate(0.9, bad, 1.0, "t")
    with pytest.raises(QuantizationGateError, match="int8 perplexity"):
        check_perplexity_gate(12.0, bad, 2.0, "t")
    with pytest.raises(QuantizationGateError, match="int8 perplexity"):
        check_perplexity_gate(bad, 12.0, 2.0, "t")
    assert check_perplexity_gate(12.0, 12.12, 2.0, "t") == pytest.approx(1.0)


def test_the_int8_agreement_gate_is_the_users_max_int8_drop():
    half = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)  # agrees with REF on 1 of 2 rows
    assert check_parity(REF, REF, half, "t", max_int8_drop=100)["int8_agreement"] == 0.5
    assert check_parity(REF, REF, half, "t", max_int8_drop=50)["int8_agreement"] == 0.5
    with pytest.raises(
        ExportError, match=r"agree with fp32 on 50.00% of messages \(required 99% by --max-int8-drop 1\)"
    ):
        check_parity(REF, REF, half, "t", max_int8_drop=1)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_challenger_is_never_promoted(bad):
    rule = PromotionRule(metric="accuracy")
    first = decide({"accuracy": bad}, None, rule)  # before: "no champion yet", promoted
    assert (first.decision, first.alert) == ("keep", True)
    assert first.reason == f"the challenger's accuracy is {bad}, not a finite number"
    assert decide({"accuracy": bad}, {"accuracy": 0.9}, rule).decision == "keep"
    lm = decide({"val_perplexity": bad}, {"val_perplexity": 12.0}, PromotionRule(metric="val_perplexity"))
    assert (lm.decision, lm.alert) == ("keep", True)
    replaced = decide({"accuracy": 0.8}, {"accuracy": bad}, rule)
    assert (replaced.decision, replaced.reason) == ("promote", f"the champion's accuracy is {bad}")
    with pytest.raises(ValueError, match="finite number"):  # a rule is a StrictConfig: no NaN or infinity
        PromotionRule(metric="accuracy", margin=NAN)


@pytest.fixture(scope="module")
def nan_classifier(topic_classifier, tmp_path_factory):
    """The session's topic classifier with its head's weights overwritten by NaN, outside any stage folder."""
    state = load_checkpoint(topic_classifier["best"])
    head = next(name for name in state["model"] if name.startswith("head"))
    state["model"][head][0, :16] = float("nan")
    path = tmp_path_factory.mktemp("nan-classifier") / "nan.pt"
    save_checkpoint(path, **state)
    return {"path": path, "head": head}


@pytest.mark.slow
def test_a_checkpoint_with_nan_weights_is_refused_by_every_reader(nan_classifier, topic_classifier, tokenizer, capsys):
    path, head = nan_classifier["path"], nan_classifier["head"]
    message = f"{path}: weights hold NaN or infinity ({head}); the model is broken: retrain it"
    with pytest.raises(CheckpointError) as caught:
        open_model(path, CLASSIFIERS).classifier()
    assert str(caught.value) == message
    with pytest.raises(CheckpointError, match="weights hold NaN or infinity"):  # before: a bundle, exit 0
        export_classifier(
            path,
            topic_classifier["data"],
            path.parent / "export",
            ExportConfig(),
            tokenizer=tokenizer,
            tokenizer_files=("unused", "unused"),
        )
    assert not (path.parent / "export").exists()
    assert main(["classify", "--model", str(path), "free prize, call now"]) == 2  # before: "ham nan ..." and 0
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [f"gptflow classify: error: {message}"]


@pytest.mark.slow
def test_the_edge_runtime_refuses_nan_outputs(topic_classifier, tmp_path):
    """A bundle whose manifest is intact but whose graph computes NaN (weights broken before export)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(topic_classifier["bundle"], bundle)
    graph = onnx.load(bundle / "model.onnx")
    floats = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    broken = numpy_helper.to_array(floats[-1]).copy()
    broken[:] = np.nan
    floats[-1].CopyFrom(numpy_helper.from_array(broken, floats[-1].name))
    onnx.save(graph, bundle / "model.onnx")
    manifest = read_json(bundle / "manifest.json")
    manifest["files"]["model.onnx"] = sha256_file(bundle / "model.onnx")
    write_json_atomic(bundle / "manifest.json", manifest)
    classifier = EdgeClassifier(bundle)
    with pytest.raises(NonFiniteOutputError) as caught:  # before: label "ham", probability nan
        classifier.predict(["free prize, call now", "see you at lunch"])
    assert str(caught.value) == (
        f"{bundle / 'model.onnx'} gives NaN or infinite logits for 2 of 2 inputs: the model is broken; "
        "retrain it, or export it again from a checkpoint with finite weights"
    )


def test_generation_refuses_nan_logits():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        model.final_norm.weight[:4] = float("inf")  # finite-looking until the head multiplies it out
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite logits at generation step 1"):
        generate(model, torch.tensor([[1, 2, 3]]), 5)
    with pytest.raises(NonFiniteLogitsError):
        generate(model, torch.tensor([[1, 2, 3]]), 5, temperature=0.8, top_k=5, seed=1)


@pytest.mark.slow
def test_a_stage_file_changed_after_its_manifest_is_refused(topic_classifier, tokenizer, tmp_path, capsys):
    """The classifier stage's folder, copied: the copy opens, then one flipped byte of best.pt is refused."""
    stage = tmp_path / "clf"
    shutil.copytree(topic_classifier["best"].parent, stage)
    best = stage / topic_classifier["best"].name
    assert best.name in read_json(stage / "manifest.json")["outputs"]
    assert open_model(best, CLASSIFIERS).classifier().names == ["billing", "food", "sport"]
    data = bytearray(best.read_bytes())
    data[-200] ^= 0xFF  # inside the zip's last stored record: the file still opens as an archive
    best.write_bytes(bytes(data))
    expected = (
        f"{best.resolve()} no longer matches the sha256 that {stage.resolve() / 'manifest.json'} records for it "
        "(it changed after its stage wrote it): run the stage again, or restore the file"
    )
    with pytest.raises(StageError) as caught:
        open_model(best, CLASSIFIERS)
    assert str(caught.value) == expected
    assert main(["classify", "--model", str(best), "free prize"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"gptflow classify: error: {expected}"]
    alone = shutil.copy(best, tmp_path / "alone.pt")  # no manifest: the damaged zip directory is what is reported
    assert main(["classify", "--model", str(alone), "free prize"]) == 2  # before: a UnicodeDecodeError traceback
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gptflow classify: error: {alone} is not a PyTorch checkpoint (expected the zip archive torch.save writes)"
    ]


@pytest.mark.slow
def test_int8_agreement_is_gated_by_the_users_max_int8_drop(topic_classifier, tokenizer, mirror, tmp_path):
    """A classifier whose classes nearly tie (the head's rows pulled to within 1e-4 of each other, so int8 rounding
    flips predictions) exports under `max_int8_drop: 100` (configs/tiny.yaml's setting; before: "required 99%"),
    and fails the agreement gate under the default 1."""
    state = load_checkpoint(topic_classifier["best"])
    for name in ("head.weight", "head.bias"):
        tensor = state["model"][name]
        tensor.copy_(tensor[:1] + 1e-4 * (tensor - tensor[:1]))
    tie = save_checkpoint(tmp_path / "near-tie.pt", **state)
    data = topic_classifier["data"]
    export = dict(tokenizer=tokenizer, tokenizer_files=tokenizer_files(load_settings(mirror=mirror)))
    with pytest.raises(
        ExportError, match=r"agree with fp32 on \d+\.\d+% of messages \(required 99% by --max-int8-drop 1\)"
    ):
        export_classifier(tie, data, tmp_path / "strict", ExportConfig(), **export)
    report = export_classifier(tie, data, tmp_path / "lenient", ExportConfig(max_int8_drop=100), **export)
    assert report["parity"]["int8_agreement"] < 0.99 and math.isfinite(report["int8_drop_points"])
    assert "model.int8.onnx" in read_json(f"{report['bundle']}/manifest.json")["files"]


def test_a_language_model_with_nan_in_one_matrix_is_refused(prefect_harness, tmp_path, settings, capsys):
    """Before: `export --int8` of it exited 0, its perplexity gate passing NaN."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny"))
    with torch.no_grad():
        model.blocks[1].mlp.fc.weight[3, 7] = float("nan")
    path = save_model(tmp_path / "model.pt", model)
    message = f"{path}: weights hold NaN or infinity (blocks.1.mlp.fc.weight); the model is broken: retrain it"
    with pytest.raises(CheckpointError) as caught:
        open_model(path, LANGUAGE_MODELS).language_model()
    assert str(caught.value) == message
    corpus = write_random_tokens(tmp_path / "corpus", 2000, 2000, seed=0)
    export = ["export", str(path), "--data", str(corpus), "--out", str(tmp_path / "x")]
    assert main(["generate", "hi", "--model", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"gptflow generate: error: {message}"]
    assert main(export) == 2  # found in the flow: the line names the log file with the traceback
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"gptflow export: error: {message} (traceback: ")
    assert not (tmp_path / "x" / "bundle").exists() and not (tmp_path / "x" / "manifest.json").exists()
