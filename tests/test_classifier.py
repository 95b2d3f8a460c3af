"""Classifier model, data and fine-tuning loop: shapes, pooling, freezing, collate, resume, early stopping."""

from __future__ import annotations

import pytest
import torch
from classify_data import write_splits
from conftest import tiny_config

from edge.text import encode_texts
from eval.plots import plot_training_curves
from gptflow.splits import SplitError, read_labelled
from model.classifier import ClassifierError, SequenceClassifier, collate
from model.configs import ClassifierConfig
from model.files import CLASSIFIERS
from model.finetune_classifier import finetune
from model.gpt import GPTModel
from model.opener import open_model


def tiny_classifier(n_classes: int = 3, pooling: str = "last_real") -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier(GPTModel(tiny_config("gpt")), n_classes, pooling).eval()


def test_logit_shapes_and_no_lm_head():
    model = tiny_classifier(3)
    x, mask, _ = collate([[1, 2, 3, 4, 5], [6, 7]])
    assert model(x, mask).shape == (2, 3)
    assert not hasattr(model.backbone, "out_head")
    assert not any("out_head" in k for k in model.state_dict())


def test_last_real_pooling_reads_the_last_real_token():
    model = tiny_classifier(3)
    x, mask, _ = collate([[10, 20, 30, 40, 50], [60, 70], [80, 90, 100]])
    with torch.no_grad():
        hidden = model.backbone.features(x)
        manual = torch.stack([hidden[0, 4], hidden[1, 1], hidden[2, 2]])
        assert torch.equal(model(x, mask), model.head(manual))
        # padding after the last real token changes nothing (causal attention): same as the unpadded row
        alone = model(torch.tensor([[60, 70]]), torch.tensor([[1, 1]]))
        assert torch.allclose(model(x, mask)[1], alone[0], atol=1e-5)


def test_mean_pooling_averages_the_real_tokens_only():
    model = tiny_classifier(2, "mean")
    x, mask, _ = collate([[10, 20, 30, 40], [60, 70]])
    with torch.no_grad():
        hidden = model.backbone.features(x)
        manual = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])
        assert torch.allclose(model(x, mask), model.head(manual), atol=1e-6)
        # the padded row equals the unpadded one; the padding's hidden states would change a plain mean
        alone = model(torch.tensor([[60, 70]]), torch.tensor([[1, 1]]))
        assert torch.allclose(model(x, mask)[1], alone[0], atol=1e-5)
        assert not torch.allclose(model.head(hidden[1].mean(0)), alone[0], atol=1e-3)


def test_last_position_pooling_reads_the_last_column():
    model = tiny_classifier(2, "last_position")
    x, mask, _ = collate([[10, 20, 30], [60]])
    with torch.no_grad():
        assert torch.equal(model(x, mask), model.head(model.backbone.features(x)[:, -1]))


@pytest.mark.parametrize(("part", "expected"), [("head", 195), ("last_k", 50_307), ("all", 3_324_931)])
def test_trainable_parts(part, expected):
    # tiny: emb 64; block 49,984 params; final norm 128; head 64*3+3; embeddings 50257*64 + 128*64
    model = tiny_classifier(3)
    assert model.set_trainable(part, last_k=1) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_last_k_two_blocks_and_too_many():
    model = tiny_classifier(3)
    assert model.set_trainable("last_k", last_k=2) == 195 + 2 * 49_984 + 128
    with pytest.raises(ClassifierError, match="last_k 3 exceeds"):
        model.set_trainable("last_k", last_k=3)


def test_collate_pads_each_batch_to_its_longest_row():
    ids, mask, labels = collate([[1, 2, 3], [4]], [0, 2])
    assert ids.tolist() == [[1, 2, 3], [4, 50256, 50256]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [0, 2]
    assert ids.dtype == mask.dtype == torch.int64


def test_encode_truncates_and_never_returns_empty(tokenizer):
    assert encode_texts(tokenizer, ["Hello, world", "", "Hello, world"], 2) == [[15496, 11], [50256], [15496, 11]]


def test_bad_config_and_bad_split(tmp_path):
    with pytest.raises(ValueError, match=r"expected random \| gpt2:<preset-or-safetensors> \| checkpoint:<path>"):
        ClassifierConfig(init="huggingface")
    (tmp_path / "test.csv").write_text("text,label\nhello,0\nbye,7\n")
    with pytest.raises(SplitError, match=r"test.csv: label 7 \(row 3\) is not one of the ids in labels.json \[0, 1\]"):
        read_labelled(tmp_path / "test.csv", {"a": 0, "b": 1})


CONFIG = dict(trainable="all", lr=1e-3, epochs=2, batch_size=8, eval_every=3, checkpoint_every=3, patience=None)


def evals(history):
    return [h for h in history if h["kind"] == "eval"]


@pytest.mark.slow
def test_resume_after_a_crash_gives_identical_params(tmp_path, tokenizer):
    data = write_splits(tmp_path / "data", (10, 3, 3))  # 30 train texts: 4 steps per epoch, 8 steps
    config = tiny_config("classifier", **CONFIG)
    full = finetune(data, tmp_path / "full", config, tokenizer=tokenizer)
    assert [h["step"] for h in evals(full.history)] == [3, 6, 8]

    def crash(metrics):
        if metrics["kind"] == "eval" and metrics["step"] == 6:
            raise KeyboardInterrupt  # after step 6's evaluation, before its checkpoint: resume replays 4-6

    with pytest.raises(KeyboardInterrupt):
        finetune(data, tmp_path / "resumed", config, tokenizer=tokenizer, on_log=crash)
    resumed = finetune(data, tmp_path / "resumed", config, tokenizer=tokenizer)
    assert evals(resumed.history) == evals(full.history)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run with the same data and config is reused
    assert finetune(data, tmp_path / "full", config, tokenizer=tokenizer).reused


@pytest.mark.slow
def test_keep_last_trains_the_whole_schedule_and_keeps_the_final_weights(tmp_path, tokenizer):
    data = write_splits(tmp_path / "data", (10, 3, 3))
    config = tiny_config("classifier", **{**CONFIG, "epochs": 3, "patience": None, "keep": "last"})
    result = finetune(data, tmp_path / "run", config, tokenizer=tokenizer)
    assert [h["step"] for h in evals(result.history)] == [3, 6, 9, 12]
    assert [h["best"] for h in evals(result.history)] == [False, False, False, True]
    assert result.summary["best_step"] == 12 and not result.summary["early_stopped"]
    assert result.summary["best_val_accuracy"] == evals(result.history)[-1]["val_accuracy"]
    kept = open_model(tmp_path / "run", CLASSIFIERS).classifier().model.state_dict()
    final = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)
    assert ClassifierConfig(keep="last").patience is None  # no early stopping by default
    with pytest.raises(ValueError, match="keep='last' trains the whole schedule"):
        ClassifierConfig(keep="last", patience=2)


@pytest.mark.slow
def test_early_stopping_keeps_the_best_checkpoint(tmp_path, tokenizer):
    data = write_splits(tmp_path / "data", (10, 3, 3))
    config = tiny_config("classifier", **{**CONFIG, "lr": 1e-12, "epochs": 3, "patience": 2})  # nothing improves
    result = finetune(data, tmp_path / "run", config, tokenizer=tokenizer)
    assert [h["step"] for h in evals(result.history)] == [3, 6, 9]
    assert result.summary["early_stopped"] and result.summary["best_step"] == 3
    loaded = open_model(tmp_path / "run", CLASSIFIERS).classifier()
    assert loaded.labels == {"billing": 0, "food": 1, "sport": 2} and loaded.max_length == 128
    curves = plot_training_curves(result.history, tmp_path / "curves.png", "fine-tuning")
    assert curves.read_bytes()[:4] == b"\x89PNG"
