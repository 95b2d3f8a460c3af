"""`gptflow inspect` and the inspect flow: files, artifacts in the run, reuse, and one-line errors before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from cli import main
from flows.inspect import inspect_flow
from model.checkpoint import save_model
from model.classifier import SequenceClassifier, save_classifier
from model.configs import InspectConfig
from model.gpt import GPTModel

PROBE = "Every effort moves you"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(tiny_config("gpt")).eval()


@pytest.fixture
def lm_checkpoint(tmp_path):
    return save_model(tmp_path / "base" / "model.pt", tiny())


def test_inspect_flow_publishes_figures_and_tables_to_its_run(prefect_harness, settings, lm_checkpoint):
    state = inspect_flow(str(lm_checkpoint), PROBE, InspectConfig(top_k=3), return_state=True)
    result = state.result()
    assert not result["reused"] and result["kind"] == "lm"
    assert result["out_dir"].startswith(str(settings.home / "inspect" / "base-"))
    assert set(result["figures"]) == {
        "attention-layer-0",
        "attention-layer-1",
        "attention-focus",
        "logit-lens",
        "embeddings-words",
        "embeddings-positions",
        "sampling",
    }
    for png in result["figures"].values():
        assert open(png, "rb").read(8) == PNG_MAGIC
    report = json.loads(open(result["json"]).read())
    assert [t["id"] for t in report["tokens"]] == [6109, 3626, 6100, 345]
    assert result["metrics"]["tokens"] == 4 and result["metrics"]["next_token"] == repr(
        report["next_token"][0]["piece"]
    )

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    keys = {a.key for a in artifacts}
    prefix = "inspect-" + result["out_dir"].rsplit("/", 1)[-1].lower()
    for figure in result["figures"]:
        assert f"{prefix}-{figure}" in keys
    for table in ("tokens", "trace", "heads", "next-token", "logit-lens", "sampling"):
        assert f"{prefix}-{table}-table" in keys
    plot = next(a for a in artifacts if a.key == f"{prefix}-logit-lens")
    assert plot.type == "markdown" and "data:image/png;base64," in plot.data
    assert len(keys) == len(artifacts)  # no key published twice
    tokens = next(a for a in artifacts if a.key == f"{prefix}-tokens-table")
    rows = tokens.data if isinstance(tokens.data, list) else json.loads(tokens.data)
    assert [r["id"] for r in rows] == [6109, 3626, 6100, 345]
    link = next(a for a in artifacts if a.key == f"{prefix}-report")
    assert link.type == "markdown" and result["report"] in link.data  # the link to report.md

    again = inspect_flow(str(lm_checkpoint), PROBE, InspectConfig(top_k=3))
    assert again["reused"] and again["report"] == result["report"]


def test_inspect_cli_writes_the_report_and_reuses_it(prefect_harness, settings, lm_checkpoint, tmp_path, capsys):
    out = tmp_path / "look"
    argv = ["inspect", str(lm_checkpoint), PROBE, "--layer", "1", "--head", "1", "--top-k", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"inspected {lm_checkpoint} (lm)" in printed and f"report: {out / 'report.md'}" in printed
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "attention.npy", "attention_layer01_head01.png", "logit_lens.png"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["focus"] == {"layer": 1, "head": 1} and len(report["next_token"]) == 4
    markdown = (out / "report.md").read_text()
    assert "](attention_layer00.png)" in markdown and "](logit_lens.png)" in markdown
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out


def test_inspect_cli_on_a_classifier(prefect_harness, settings, tmp_path, capsys):
    classifier = SequenceClassifier(tiny(1), 2).eval()
    path = save_classifier(tmp_path / "clf" / "best.pt", classifier, {"ham": 0, "spam": 1}, 32, {"data": "x"})
    assert main(["inspect", str(path.parent), "WIN a prize now", "--out", str(tmp_path / "look")]) == 0
    printed = capsys.readouterr().out
    assert f"inspected {path} (classifier)" in printed and "class_probability" in printed
    report = json.loads((tmp_path / "look" / "report.json").read_text())
    assert [c["label"] for c in report["classes"]] == ["ham", "spam"]
    assert (tmp_path / "look" / "classes.png").is_file() and not (tmp_path / "look" / "sampling.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{model}", ""], "the probe text is empty"),
        (["{model}", "word" + " word" * 199], "the probe text is 200 tokens; the model reads at most 128"),
        (["{model}", PROBE, "--layer", "9"], "--layer 9: the model has 2 layers (0-1)"),
        (["{model}", PROBE, "--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
        (["{model}", PROBE, "--temperatures", "1", "-0.5"], "--temperatures: Input should be greater than 0"),
        (["{notes}", PROBE], "is not a PyTorch checkpoint (expected the zip archive torch.save writes)"),
        (["{missing}", PROBE], "is neither a GPT-2 preset"),
    ],
)
def test_bad_input_is_one_line_before_any_work(settings, lm_checkpoint, tmp_path, capsys, args, message):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    paths = {"model": lm_checkpoint, "notes": notes, "missing": tmp_path / "nothing.pt"}
    assert main(["inspect", *(a.format(**paths) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptflow inspect: error: ") and message in err and err.count("\n") == 1
    assert not (settings.home / "inspect").exists()
