"""`--out` and `--no-resume` never destroy what gptflow did not write (issue 26, section 3): a folder the user chose
must be new, empty or this stage's own; other files need `--force`; another stage's folder is never written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_random_tokens

import gptflow.stage as stage_mod
from cli import main
from gptflow.stage import Stage, StageError
from model.pretrain import pretrain


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    return {"a.txt": tmp_path / "a.txt"}


def declare(inputs, name="demo", config=None, **kw):
    return Stage.declare(name, inputs=inputs, config=config or {"lr": 0.1}, code=["gptflow.stage"], label="x", **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def users_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"the user's own model")
    (folder / "metrics.json").write_text('{"mine": true}')
    return folder


@pytest.mark.parametrize("resume", [True, False])
def test_a_folder_of_files_gptflow_did_not_write_is_refused_naming_them(inputs, tmp_path, resume):
    chosen = users_folder(tmp_path / "mine")
    before = snapshot(chosen)
    with pytest.raises(StageError) as refused:
        declare(inputs, out_dir=chosen).plan(resume=resume)
    message = str(refused.value)
    assert message.startswith(f"{chosen} is not empty and holds no gptflow stage (metrics.json, model.pt): ")
    assert "--force" in message and "\n" not in message
    assert snapshot(chosen) == before  # nothing written, nothing removed

    for name in ("a", "b", "c"):
        (chosen / f"{name}.txt").write_text(name)
    (chosen / "sub").mkdir()
    with pytest.raises(StageError, match=r"\(a.txt, b.txt, c.txt and 3 more\)"):
        declare(inputs, out_dir=chosen).plan(resume=resume)


def test_force_writes_beside_them_and_the_folder_is_then_ours(inputs, tmp_path):
    chosen = users_folder(tmp_path / "mine")
    stage = declare(inputs, out_dir=chosen, force=True)
    assert stage.plan(resume=False).action == "run"
    assert (chosen / "model.pt").read_bytes() == b"the user's own model"  # planning removes nothing
    assert json.loads((chosen / stage_mod.BUILDING_NAME).read_text()) == {"stage": stage.key}
    (chosen / "out.txt").write_text("product")
    stage.complete(["out.txt"])
    assert not (chosen / stage_mod.BUILDING_NAME).exists()  # the manifest says whose folder it is now
    assert declare(inputs, out_dir=chosen).plan().action == "reuse"  # no --force needed any more


@pytest.mark.parametrize("contents", ["none", "empty", "hidden only"])
def test_a_new_or_empty_folder_is_taken(inputs, tmp_path, contents):
    chosen = tmp_path / "new"
    if contents != "none":
        chosen.mkdir()
    if contents == "hidden only":
        (chosen / ".DS_Store").write_bytes(b"\0")
    assert declare(inputs, out_dir=chosen).plan().action == "run"


@pytest.mark.parametrize("text", ['{"files": {"model.onnx": "abc"}}', "[1, 2]", "not json"])
def test_a_manifest_json_of_the_users_is_not_ours(inputs, tmp_path, text):
    chosen = tmp_path / "bundle"
    chosen.mkdir()
    (chosen / "manifest.json").write_text(text)
    with pytest.raises(StageError, match=r"holds no gptflow stage \(manifest.json\)"):
        declare(inputs, out_dir=chosen).plan(resume=False)
    assert (chosen / "manifest.json").read_text() == text


def test_a_partial_run_of_the_same_stage_is_its_own(inputs, tmp_path):
    chosen = tmp_path / "run"
    chosen.mkdir()
    declare(inputs, out_dir=chosen).plan()  # interrupted after writing an output, before its manifest
    (chosen / "out.txt").write_text("half")
    assert declare(inputs, out_dir=chosen).plan().action == "run"
    assert declare(inputs, config={"lr": 0.5}, out_dir=chosen).plan(resume=False).action == "run"


@pytest.mark.parametrize("evidence", ["manifest.json", "building.json", "its checkpoint"])
@pytest.mark.parametrize("resume, force", [(True, False), (False, False), (False, True)])
def test_another_stages_folder_is_refused_even_with_no_resume_or_force(inputs, tmp_path, evidence, resume, force):
    chosen = tmp_path / "classifier"
    chosen.mkdir()
    other = declare(inputs, "classify", out_dir=chosen)
    other.plan()
    (chosen / "best.pt").write_bytes(b"weights")
    if evidence == "manifest.json":
        other.complete(["best.pt"])
    elif evidence == "its checkpoint":
        (chosen / stage_mod.BUILDING_NAME).unlink()  # e.g. a folder written before the marker existed
    before = snapshot(chosen)
    stage = declare(inputs, "pretrain", out_dir=chosen, force=force)
    with pytest.raises(StageError) as refused:
        stage.plan(resume=resume, checkpoint=lambda: other.key)
    assert str(refused.value) == (
        f"{chosen} is the folder of a classify stage ({evidence}); a pretrain stage never writes into another "
        "stage's folder, not even with --no-resume or --force: choose another output folder"
    )
    assert snapshot(chosen) == before


def test_the_same_stage_may_start_over_in_its_own_folder(inputs, tmp_path):
    chosen = tmp_path / "run"
    chosen.mkdir()
    first = declare(inputs, out_dir=chosen)
    first.plan()
    (chosen / "out.txt").write_text("product")
    first.complete(["out.txt"])
    other_config = declare(inputs, config={"lr": 0.5}, out_dir=chosen)
    with pytest.raises(StageError, match=r"different config \(config lr 0.1 -> 0.5\); .* or --no-resume"):
        other_config.plan(checkpoint=lambda: first.key)  # unchanged: the same stage's checkpoint of other config
    assert other_config.plan(resume=False, checkpoint=lambda: first.key).action == "run"
    assert not other_config.manifest_path.exists()


def test_a_folder_the_contract_names_is_not_checked(inputs, settings):
    stage = declare(inputs)
    stage.dir.mkdir(parents=True)
    (stage.dir / "notes.txt").write_text("mine")
    assert stage.plan().action == "run" and not (stage.dir / stage_mod.BUILDING_NAME).exists()


# The two cases of the issue with the real pretraining stage (refused before it trains: fast).


@pytest.fixture
def corpus(tmp_path):
    return write_random_tokens(tmp_path / "corpus", 400, 200, seed=0)


TINY = tiny_config("pretrain", context_length=16, batch_size=2, steps=2, eval_every=2, eval_batches=1, sample_tokens=0)


def test_pretrain_with_no_resume_never_writes_into_a_classifiers_folder(inputs, corpus, tmp_path, settings):
    chosen = tmp_path / "classifier"
    chosen.mkdir()
    classifier = declare(inputs, "classify", out_dir=chosen)
    classifier.plan()
    torch.save({"stage": classifier.key, "step": 3}, chosen / "last.pt")
    (chosen / "best.pt").write_bytes(b"weights")
    classifier.complete(["best.pt", "last.pt"])
    before = snapshot(chosen)
    for resume in (True, False):  # the refusal used to suggest --no-resume, which then mixed the two stages
        with pytest.raises(StageError, match=r"is the folder of a classify stage \(manifest.json\)"):
            pretrain(corpus, chosen, TINY, resume=resume, force=True, progress=False)
    (chosen / "manifest.json").unlink()  # unfinished: only its checkpoint says whose folder it is
    with pytest.raises(StageError, match=r"is the folder of a classify stage \(its checkpoint\)"):
        pretrain(corpus, chosen, TINY, resume=False, progress=False)
    assert snapshot(chosen) == {k: v for k, v in before.items() if k != "manifest.json"}


def test_cli_pretrain_out_over_a_users_model_is_refused_unless_forced(
    prefect_harness, corpus, tmp_path, settings, capsys
):
    chosen = users_folder(tmp_path / "mine")
    (chosen / "notes.txt").write_text("keep me")
    args = ["pretrain", "--corpus", str(corpus), "--preset", "tiny", "--steps", "2", "--batch-size", "2"]
    args += ["--context-length", "16", "--eval-every", "2", "--checkpoint-every", "2", "--out", str(chosen)]
    for extra in ([], ["--no-resume"]):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert f"{chosen} is not empty and holds no gptflow stage (metrics.json, model.pt, notes.txt)" in err
        assert "--force" in err and err.count("\n") == 1, err
        assert (chosen / "model.pt").read_bytes() == b"the user's own model"
    assert main(args + ["--force"]) == 0
    assert (chosen / "manifest.json").is_file() and (chosen / "notes.txt").read_text() == "keep me"
    capsys.readouterr()
    assert main(args) == 0 and capsys.readouterr().out.startswith("reused tiny")  # ours now: no --force needed


def test_evaluate_out_dir_is_refused_unless_forced_and_its_own_folder_is_not(
    prefect_harness, fake_ollama, tmp_path, settings
):
    from fake_ollama import closed_port_host

    from eval.judge import JudgeConfig
    from flows.evaluate import evaluate_responses_flow

    responses = tmp_path / "responses.json"
    entries = [{"instruction": "Say hi", "input": "", "output": "hi", "model_response": "hi"}]
    responses.write_text(json.dumps(entries))
    judge = JudgeConfig(host=fake_ollama.host, backoff_s=0)
    # skipped (no judge) into the folder the contract names, then judged there: its own partial report is no
    # stranger's file
    assert evaluate_responses_flow(str(responses), judge=JudgeConfig(host=closed_port_host(), timeout_s=2)).status == (
        "skipped"
    )
    assert evaluate_responses_flow(str(responses), judge=judge).status == "completed"

    chosen = users_folder(tmp_path / "mine")
    with pytest.raises(StageError, match=r"holds no gptflow stage \(metrics.json, model.pt\)"):
        evaluate_responses_flow(str(responses), judge=judge, out_dir=str(chosen))
    outcome = evaluate_responses_flow(str(responses), judge=judge, out_dir=str(chosen), force=True)
    assert outcome.status == "completed" and outcome.out_dir == str(chosen)
    assert (chosen / "model.pt").read_bytes() == b"the user's own model"
