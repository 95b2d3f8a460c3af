"""Domain-adaptive pretraining (model/dapt.py) and classifier ensembles: the recipe's config, the compact
vocabulary, the ensemble checkpoint, its single ONNX graph and its torch-free edge bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from classify_data import make_texts, write_splits
from conftest import REPO_ROOT, tiny_config
from pydantic import ValidationError
from test_export_edge import classify_with_edge_alone

from edge.runtime import EdgeClassifier, verify_bundle
from edge.text import encode_texts, softmax
from gptflow.settings import load_settings
from gptflow.tokenizer import EOT_ID, tokenizer_files
from model.classifier import ENSEMBLE_FORMAT, ClassifierEnsemble, ClassifierError, predict_logits, split_logits
from model.config import GPTConfig
from model.configs import ClassifierConfig, ExportConfig
from model.dapt import DaptError, compact_vocab, corpus_tokens, expand_vocab
from model.files import CHECKPOINT_LMS, CLASSIFIERS
from model.finetune_classifier import build_ensemble, finetune, pretrain_domain
from model.gpt import GPTModel
from model.onnx_export import export_classifier
from model.opener import open_model

SHAPE = {"context_length": 64, "emb_dim": 32, "n_layers": 2, "n_heads": 2}
DAPT = {"steps": 12, "window": 16, "batch_size": 4, "warmup_steps": 2}
FINETUNE = {"trainable": "all", "lr": 2e-3, "epochs": 2, "batch_size": 8, "keep": "last"}


def test_the_spam_recipe_is_a_classifier_config():
    recipe = ClassifierConfig(**yaml.safe_load((REPO_ROOT / "configs" / "spam-best.yaml").read_text()))
    assert (recipe.shape.n_layers, recipe.shape.emb_dim, recipe.shape.n_heads) == (6, 256, 8)
    assert (recipe.dapt.steps, recipe.dapt.window, recipe.pooling, recipe.keep) == (800, 64, "last_real", "last")
    assert [m.seed for m in recipe.members()] == list(recipe.ensemble) == [31, 32, 33]
    assert all(m.ensemble == () and m.dapt == recipe.dapt for m in recipe.members())
    train = recipe.dapt.train_config(recipe.members()[1])
    assert (train.seed, train.context_length, train.steps, train.dropout, train.lr) == (32, 64, 800, 0.0, 2e-3)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"ensemble": (5,)}, "ensemble: expected 2 or more different seeds, got [5]"),
        ({"ensemble": (5, 5)}, "ensemble: expected 2 or more different seeds, got [5, 5]"),
        ({"shape": SHAPE, "init": "checkpoint:x.pt"}, "init must be random, not checkpoint:x.pt"),
        ({"dapt": {"steps": 0}}, "dapt.steps"),
        ({"dapt": {"windows": 3}}, "dapt.windows"),
    ],
)
def test_bad_recipes_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ClassifierConfig(**fields)


def test_compact_vocabulary_computes_the_same_and_expands_back():
    torch.manual_seed(0)
    full = GPTModel(GPTConfig(vocab_size=300, **SHAPE)).eval()
    before = full.tok_emb.weight.detach().clone()
    keep = torch.tensor([3, 17, 42, 299])
    compact = compact_vocab(full, keep).eval()
    ids = torch.tensor([[0, 1, 2, 3, 1]])  # compact ids of 3, 17, 42, 299, 17
    with torch.no_grad():
        assert torch.allclose(compact(ids), full(keep[ids])[..., keep], atol=1e-6)
        compact.tok_emb.weight.add_(1.0)
        compact.blocks[0].attn.proj.weight.mul_(2.0)
    expand_vocab(full, compact, keep)
    assert torch.equal(full.tok_emb.weight[keep], before[keep] + 1.0)
    others = torch.ones(300, dtype=torch.bool)
    others[keep] = False
    assert torch.equal(full.tok_emb.weight[others], before[others])  # tokens the corpus lacks keep their rows
    assert full.out_head.weight is full.tok_emb.weight  # still tied
    assert torch.equal(full.blocks[0].attn.proj.weight, compact.blocks[0].attn.proj.weight)


def data_with_unused(root: Path) -> Path:
    data = write_splits(root, (20, 5, 10))
    make_texts(3, seed=7).assign(label=0).to_csv(data / "unused.csv", index=False)
    return data


@pytest.mark.slow
def test_dapt_reads_train_and_unused_texts_only_and_keeps_the_full_vocabulary(tmp_path, tokenizer, settings):
    data = data_with_unused(tmp_path / "data")
    texts = [pd.read_csv(data / f)["text"].tolist() for f in ("train.csv", "unused.csv")]
    expected = [t for row in tokenizer.encode_batch(texts[0] + texts[1]) for t in (*row, EOT_ID)]
    assert corpus_tokens(data, tokenizer).tolist() == expected

    config = ClassifierConfig(shape=SHAPE, dapt=DAPT, seed=4, **FINETUNE)
    result = pretrain_domain(data, None, config, tokenizer=tokenizer)
    assert result.out_dir.parent == settings.home / "dapt" and "seed4" in result.out_dir.name
    assert (result.metrics["steps"], result.metrics["corpus_tokens"]) == (12, len(expected))
    assert result.metrics["vocab_used"] == len(set(expected))
    trained = open_model(result.model_path, CHECKPOINT_LMS).language_model()
    cfg = trained.cfg
    assert cfg.vocab_size == 50257 and cfg.context_length == 64
    start = config.start_model(0.0)
    unseen = torch.ones(50257, dtype=torch.bool)
    unseen[sorted(set(expected))] = False
    assert torch.equal(trained.tok_emb.weight[unseen], start.tok_emb.weight[unseen])
    assert not torch.equal(trained.tok_emb.weight[~unseen], start.tok_emb.weight[~unseen])
    assert pretrain_domain(data, None, config, tokenizer=tokenizer).reused
    with pytest.raises(ClassifierError, match="finetune trains one classifier: pretrain it with pretrain_domain"):
        finetune(data, None, config, tokenizer=tokenizer)
    too_wide = config.model_copy(update={"dapt": {**DAPT, "window": 5000}})
    with pytest.raises(DaptError, match=f"{data}: the training texts hold {len(expected)} tokens, fewer than one"):
        pretrain_domain(data, None, too_wide, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, tokenizer, mirror):
    root = tmp_path_factory.mktemp("ensemble")
    data = write_splits(root / "data", (20, 5, 34))
    settings = load_settings(mirror=mirror, home=root / "home")
    members = []
    for seed in (1, 2):
        config = tiny_config("classifier", seed=seed, **FINETUNE)
        tuned = finetune(data, root / f"member{seed}", config, tokenizer=tokenizer)
        _, splits = split_logits(open_model(tuned.best, CLASSIFIERS).classifier(), data, tokenizer=tokenizer)
        metrics = {s: {"accuracy": float((logits.argmax(1) == y).mean())} for s, (y, logits) in splits.items()}
        members.append({"best": str(tuned.best), "metrics": metrics, "test_logits": splits["test"][1]})
    built = build_ensemble(data, members, root / "ensemble")
    report = export_classifier(
        built.best,
        data,
        root / "export",
        ExportConfig(),
        tokenizer=tokenizer,
        tokenizer_files=tokenizer_files(settings),
    )
    return {"root": root, "data": data, "members": members, "built": built, "report": report}


@pytest.mark.slow
def test_the_ensemble_averages_its_members_probabilities(ensemble, tokenizer):
    loaded = open_model(ensemble["built"].best, CLASSIFIERS).classifier()
    assert isinstance(loaded.model, ClassifierEnsemble) and len(loaded.model.members) == 2
    assert torch.load(ensemble["built"].best, weights_only=True)["format"] == ENSEMBLE_FORMAT
    _, splits = split_logits(loaded, ensemble["data"], tokenizer=tokenizer)
    mean = np.mean([softmax(m["test_logits"]) for m in ensemble["members"]], axis=0)
    assert np.allclose(softmax(splits["test"][1]), mean, atol=1e-6)
    expected = [{split: v["accuracy"] for split, v in m["metrics"].items()} for m in ensemble["members"]]
    assert [m["accuracy"] for m in loaded.members] == expected
    assert build_ensemble(ensemble["data"], ensemble["members"], ensemble["root"] / "ensemble").reused


@pytest.mark.slow
def test_the_ensemble_exports_as_one_graph_with_parity_and_a_card(ensemble):
    report = ensemble["report"]
    assert report["parity"]["n"] == 102 and report["parity"]["fp32_prediction_matches"] == 102
    assert report["parity"]["fp32_max_abs_logit_diff"] <= 1e-4 and report["parity"]["int8_agreement"] >= 0.99
    bundle = Path(report["bundle"])
    manifest = verify_bundle(bundle)
    assert [Path(m["checkpoint"]).parent.name for m in manifest["members"]] == ["member1", "member2"]
    assert set(manifest["files"]) == {
        "model.onnx",
        "model.int8.onnx",
        "encoder.json",
        "vocab.bpe",
        "labels.json",
        "card.md",
    }
    card = (bundle / "card.md").read_text()
    assert "An ensemble of 2 classifiers" in card and "| member1 |" in card and "| member2 |" in card
    test_acc = ensemble["members"][0]["metrics"]["test"]["accuracy"]
    assert f"{100 * test_acc:.2f}%" in card
    assert f"| onnx_int8 | {100 * report['accuracy']['onnx_int8']:.2f}% |" in card


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.slow
def test_the_ensemble_bundle_runs_without_torch(ensemble, tokenizer, tmp_path, int8):
    texts = make_texts(3, seed=11)["text"].tolist()
    lines = classify_with_edge_alone(ensemble["report"]["bundle"], texts, int8, tmp_path)
    loaded = open_model(ensemble["built"].best, CLASSIFIERS).classifier()
    probs = softmax(predict_logits(loaded.model, encode_texts(tokenizer, texts, loaded.max_length)))
    edge = EdgeClassifier(tmp_path / "bundle", int8=int8).predict(texts)
    assert [line[0] for line in lines] == [name for name, _ in edge]
    if not int8:
        assert [line[0] for line in lines] == [loaded.names[k] for k in probs.argmax(1)]
        assert np.allclose([float(line[1]) for line in lines], probs.max(1), atol=1e-4)


@pytest.mark.slow
def test_an_ensemble_of_other_labels_or_of_ensembles_is_refused(ensemble, tmp_path):
    other = write_splits(tmp_path / "other", (20, 5, 10))
    labels = json.loads((other / "labels.json").read_text())
    (other / "labels.json").write_text(json.dumps({f"x{k}": v for k, v in labels.items()}))
    with pytest.raises(ClassifierError, match="labels .* differ from"):
        build_ensemble(other, ensemble["members"], tmp_path / "e1")
    nested = [{"best": str(ensemble["built"].best), "metrics": {}}, ensemble["members"][0]]
    with pytest.raises(ClassifierError, match="is not a single classifier checkpoint"):
        build_ensemble(ensemble["data"], nested, tmp_path / "e2")


@pytest.mark.slow
def test_inspect_names_the_members_of_an_ensemble(ensemble):
    from model.checkpoint import CheckpointError
    from model.introspect import open_subject

    members = ", ".join(m["best"] for m in ensemble["members"])
    with pytest.raises(CheckpointError) as caught:
        open_subject(ensemble["built"].best)
    assert str(caught.value) == (
        f"{ensemble['built'].best} is a classifier-ensemble checkpoint of 2 classifiers ({members}), not a "
        "language-model checkpoint or a classifier checkpoint or GPT-2 weights; inspect a model.pt, a classifier's "
        "best.pt (one member of an ensemble), or GPT-2 weights"
    )
