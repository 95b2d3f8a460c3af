"""The stage contract: folder names, reuse / resume / run decisions and their log lines, the code-change policy."""

from __future__ import annotations

import json
import logging
import tomllib

import numpy as np
import pytest
import torch
from classify_data import write_splits
from conftest import REPO_ROOT

import gptflow.stage as stage_mod
import model.config as config_mod
from gptflow.closure import PROJECT_PACKAGES, import_closure
from gptflow.stage import Stage, StageError
from gptflow.stage_keys import describe_change
from model.checkpoint import load_checkpoint, save_model
from model.config import GPTConfig
from model.configs import ClassifierConfig, PretrainConfig
from model.finetune_classifier import finetune
from model.gpt import GPTModel
from model.pretrain import pretrain


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    return {"a.txt": tmp_path / "a.txt", "init": "random"}


def declare(inputs, config=None, **kw):
    return Stage.declare("demo", inputs=inputs, config=config or {"lr": 0.1}, code=["gptflow.stage"], label="x", **kw)


def test_folder_is_named_by_inputs_and_config(inputs, settings):
    a, b = declare(inputs), declare(inputs)
    assert a.dir == b.dir and a.dir.parent == settings.home / "demo" and a.dir.name.startswith("x-")
    assert declare(inputs, {"lr": 0.2}).dir != a.dir
    inputs["a.txt"].write_text("beta")
    assert declare(inputs).dir != a.dir
    assert a.inputs["init"] == "random" and set(a.code) == set(import_closure("gptflow.stage"))
    assert {"gptflow.stage", "gptflow.storage", "gptflow.settings"} <= set(a.code)
    with pytest.raises(StageError, match=r"demo: input a.txt .*missing.txt does not exist"):
        declare({"a.txt": inputs["a.txt"].parent / "missing.txt"})


def test_run_reuse_damaged_output_and_log_lines(inputs, settings, caplog):
    caplog.set_level(logging.INFO, logger="gptflow.stage")
    stage = declare(inputs)
    assert stage.plan() == stage_mod.Decision("run", f"{stage.dir}: nothing built yet")
    stage.dir.mkdir(parents=True)
    (stage.dir / "out.txt").write_text("product")
    manifest = stage.complete(["out.txt"], {"score": 1})
    assert manifest["outputs"]["out.txt"] == stage_mod.sha256_file(stage.dir / "out.txt")
    assert manifest["metrics"] == {"score": 1} and manifest["code"] == stage.code
    assert declare(inputs).plan().action == "reuse"
    (stage.dir / "out.txt").write_text("tampered")
    again = declare(inputs)
    assert again.plan().action == "run" and "output out.txt changed since the manifest" in again.decision.reason
    assert not again.manifest_path.exists()  # a folder being rebuilt is never taken for the finished product
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"demo runs: {stage.dir}: nothing built yet"
    assert lines[1] == f"demo reused: {stage.dir}: same inputs, config and code as its manifest"
    assert lines[2].startswith("demo runs: ") and "rebuilding" in lines[2]


def test_checkpoint_decisions(inputs, tmp_path):
    stage = declare(inputs, out_dir=tmp_path / "chosen")
    assert stage.plan(checkpoint=lambda: stage.key).action == "resume"
    assert stage.plan(resume=False, checkpoint=lambda: stage.key).action == "run"
    other_code = {**stage.key, "code": {**stage.key["code"], "gptflow.stage": "0" * 64}}
    decision = stage.plan(checkpoint=lambda: other_code)
    assert decision.action == "run" and "code of gptflow.stage changed" in decision.reason
    other_config = {**stage.key, "config": {"lr": 0.5}}
    with pytest.raises(StageError, match=r"different config \(config lr 0.5 -> 0.1\); pass another output folder"):
        stage.plan(checkpoint=lambda: other_config)
    named = declare(inputs)  # a folder the contract named: another key's checkpoint there is replaced
    assert named.plan(checkpoint=lambda: other_config).action == "run"

    def unreadable():
        raise stage_mod.GptflowError("truncated file")

    assert "checkpoint unreadable (truncated file)" in stage.plan(checkpoint=unreadable).reason
    with pytest.raises(StageError, match="was not written by this demo stage: input init changed"):
        stage.check_checkpoint({**stage.key, "inputs": {**stage.inputs, "init": "abc"}}, "last.pt")


def test_describe_change_names_inputs_config_fields_and_code():
    old = {"stage": "s", "inputs": {"a": "1", "b": "2"}, "config": {"lr": 1, "opt": {"beta": 0.9}}, "code": {"m": "x"}}
    new = {"stage": "s", "inputs": {"a": "1", "b": "3"}, "config": {"lr": 2, "opt": {"beta": 0.9}}, "code": {"m": "y"}}
    assert describe_change(old, new) == "input b changed; config lr 1 -> 2; code of m changed"
    assert describe_change(old, {**old, "stage": "t"}) == "belongs to stage 's', not 't'"


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    stream = np.tile(np.arange(1000, 1050), 40).astype(np.uint16)
    stream[:1800].tofile(folder / "train.bin")
    stream[1800:].tofile(folder / "val.bin")
    return folder


TINY = PretrainConfig(
    preset="tiny",
    context_length=16,
    batch_size=2,
    steps=4,
    warmup_steps=1,
    eval_every=2,
    log_every=1,
    eval_batches=1,
    checkpoint_every=2,
    sample_tokens=0,
)


@pytest.mark.slow
def test_code_change_retrains_and_never_restamps_a_finished_checkpoint(corpus, settings, monkeypatch):
    first = pretrain(corpus, None, TINY, progress=False)
    assert first.out_dir.parent == settings.home / "pretrain" and first.out_dir.name.startswith("corpus-tiny-")
    stamped = json.loads((first.out_dir / "manifest.json").read_text())
    assert pretrain(corpus, None, TINY, progress=False).reused

    real = stage_mod.module_digest
    monkeypatch.setattr(stage_mod, "module_digest", lambda name: "e" * 64 if name == "model.training" else real(name))
    seen = []
    second = pretrain(corpus, None, TINY, on_log=seen.append, progress=False)
    assert second.out_dir == first.out_dir and not second.reused
    assert "resume" not in [m["kind"] for m in seen]  # the finished last.pt of the old code was not resumed
    assert [m["step"] for m in seen if m["kind"] == "train"] == [1, 2, 3, 4]
    manifest = json.loads((first.out_dir / "manifest.json").read_text())
    assert manifest["code"]["model.training"] == "e" * 64 != stamped["code"]["model.training"]
    assert load_checkpoint(first.out_dir / "last.pt")["stage"]["code"]["model.training"] == "e" * 64


def test_import_closure_reads_every_import_of_the_source():
    closure = import_closure("model.pretrain")
    # model.config (where the presets live) through model.training; lazy imports inside functions count too
    assert {"model.pretrain", "model.config", "model.training", "model.gpt", "gptflow.stage", "model"} <= set(closure)
    assert not {m for m in closure if m.split(".")[0] in ("eval", "tasks", "flows", "cli")}  # model imports downward
    assert closure == sorted(closure) and import_closure(["model.pretrain"]) == closure
    assert "model.weights" in import_closure("model.init")  # imported inside InitSpec.file only
    assert set(PROJECT_PACKAGES) == {
        p.rstrip("*")
        for p in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
            "include"
        ]
    }


@pytest.mark.slow
def test_a_preset_edit_reruns_pretraining_and_an_unrelated_edit_reuses_it(corpus, settings, monkeypatch, caplog):
    """The drift the hand-kept code lists had: model.config (the presets) was not in pretraining's list."""
    caplog.set_level(logging.INFO, logger="gptflow.stage")
    first = pretrain(corpus, None, TINY, progress=False)
    real = stage_mod.module_digest

    def edited(*names):
        monkeypatch.setattr(stage_mod, "module_digest", lambda name: "e" * 64 if name in names else real(name))

    edited("eval.plots", "tasks.artifacts", "cli.common")  # modules pretraining does not import
    assert pretrain(corpus, None, TINY, progress=False).reused
    edited("model.config")  # e.g. a preset's width changed in the source
    second = pretrain(corpus, None, TINY, progress=False)
    assert second.out_dir == first.out_dir and not second.reused
    line = caplog.records[-1].getMessage()
    assert line.startswith(f"pretrain runs: {first.out_dir}: ") and "(code of model.config changed)" in line

    # the stage is keyed on the resolved shape, not the preset's name: a wider `tiny` is another model
    monkeypatch.setattr(
        config_mod, "PRESETS", {**config_mod.PRESETS, "tiny": GPTConfig(emb_dim=96, n_layers=2, n_heads=2)}
    )
    wider = pretrain(corpus, None, TINY, progress=False)
    assert not wider.reused and wider.out_dir != first.out_dir
    manifest = json.loads((wider.out_dir / "manifest.json").read_text())
    assert manifest["config"]["model"]["emb_dim"] == 96 and "preset" not in manifest["config"]


@pytest.mark.slow
def test_classifier_is_keyed_on_its_init_weights(tmp_path, tokenizer, settings):
    data = write_splits(tmp_path / "data", (10, 3, 3))
    weights = tmp_path / "base.pt"
    torch.manual_seed(0)
    save_model(weights, GPTModel(GPTConfig.from_preset("tiny")))
    config = ClassifierConfig(init=f"checkpoint:{weights}", trainable="head", epochs=1, batch_size=16)
    first = finetune(data, None, config, tokenizer=tokenizer)
    chosen = finetune(data, tmp_path / "out", config, tokenizer=tokenizer)
    torch.manual_seed(1)
    save_model(weights, GPTModel(GPTConfig.from_preset("tiny")))  # the same path, other weights
    second = finetune(data, None, config, tokenizer=tokenizer)
    assert not second.reused and second.out_dir != first.out_dir
    assert second.summary["source"]["sha256"] != first.summary["source"]["sha256"]
    assert chosen.summary["source"] == first.summary["source"]
    with pytest.raises(StageError, match="input init changed"):  # --out: not reused, not overwritten either
        finetune(data, tmp_path / "out", config, tokenizer=tokenizer)


def test_an_output_that_does_not_load_is_rebuilt_and_never_certified(inputs, settings):
    def read(path):
        if path.read_text() != "product":
            raise stage_mod.GptflowError("not a product")

    readers = {"out.txt": read}
    stage = declare(inputs)
    stage.plan(readers=readers)
    stage.dir.mkdir(parents=True)
    (stage.dir / "out.txt").write_text("half")
    with pytest.raises(StageError, match=r"output out.txt cannot be read \(not a product\); not certifying it"):
        stage.complete(["out.txt"])
    assert not stage.manifest_path.exists()
    (stage.dir / "out.txt").write_text("product")
    stage.complete(["out.txt"])
    assert declare(inputs).plan(readers=readers).action == "reuse"

    (stage.dir / "out.txt").write_text("torn")  # damaged after it was certified: rebuilt, and marked as such
    damaged = declare(inputs).plan(checkpoint=lambda: stage.key, readers=readers)
    assert damaged == stage_mod.Decision(
        "run", f"{stage.dir}: output out.txt changed since the manifest was written; rebuilding", ("out.txt",)
    )
    assert json.loads((stage.dir / stage_mod.REBUILD_NAME).read_text()) == {"damaged": ["out.txt"]}
    # the rebuild was interrupted: the checkpoint of the same key is the damaged run's, not resumed
    (stage.dir / "out.txt").write_text("product")
    again = declare(inputs).plan(checkpoint=lambda: stage.key, readers=readers)
    assert again.action == "run" and again.reason.startswith(f"{stage.dir}: an interrupted rebuild of damaged output")
    rebuilt = declare(inputs)
    rebuilt.plan(readers=readers)
    rebuilt.complete(["out.txt"])
    assert not (stage.dir / stage_mod.REBUILD_NAME).exists()
    assert declare(inputs).plan(checkpoint=lambda: stage.key, readers=readers).action == "reuse"
    stage.manifest_path.unlink()  # unfinished, with a checkpoint of the same key and an output that loads
    assert declare(inputs).plan(checkpoint=lambda: stage.key, readers=readers).action == "resume"
    (stage.dir / "out.txt").write_text("torn")
    resumed = declare(inputs).plan(checkpoint=lambda: stage.key, readers=readers)
    assert resumed.action == "run" and resumed.damaged == ("out.txt",)
    assert "output out.txt cannot be read (not a product) and its checkpoint cannot recreate it" in resumed.reason


@pytest.mark.parametrize("after", ["rerun", "rebuild killed", "truncated file certified"])
@pytest.mark.slow
def test_a_truncated_best_pt_is_rebuilt_to_the_same_weights(after, tmp_path, tokenizer, settings, caplog):
    data = write_splits(tmp_path / "data", (10, 3, 3))
    config = ClassifierConfig(
        preset="tiny", trainable="all", lr=1e-3, epochs=2, batch_size=8, eval_every=3, checkpoint_every=3
    )
    first = finetune(data, tmp_path / "run", config, tokenizer=tokenizer)
    weights = load_checkpoint(first.best)["model"]
    manifest = first.out_dir / "manifest.json"
    first.best.write_bytes(first.best.read_bytes()[:1000])
    if after == "rebuild killed":  # what a rerun killed before its first evaluation leaves
        manifest.unlink()
    elif after == "truncated file certified":  # what the stage used to do: resume at the end, hash the torn file
        stamped = json.loads(manifest.read_text())
        stamped["outputs"]["best.pt"] = stage_mod.sha256_file(first.best)
        manifest.write_text(json.dumps(stamped))
    caplog.set_level(logging.INFO, logger="gptflow.stage")
    caplog.clear()  # the first run's line too is captured when an earlier test left the logger at INFO
    again = finetune(data, tmp_path / "run", config, tokenizer=tokenizer)
    assert not again.reused
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gptflow.stage"]
    assert line.startswith(f"classify runs: {first.out_dir}: output best.pt ")  # why, in one line
    rebuilt = load_checkpoint(again.best)["model"]
    assert rebuilt.keys() == weights.keys() and all(torch.equal(rebuilt[k], weights[k]) for k in weights)
    assert json.loads(manifest.read_text())["outputs"]["best.pt"] == stage_mod.sha256_file(again.best)
    assert finetune(data, tmp_path / "run", config, tokenizer=tokenizer).reused
