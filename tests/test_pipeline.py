"""The end-to-end pipeline: parameter validation, a tiny run, reuse on rerun, and downstream-only reruns."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml
from prefect.flows import load_flow_from_entrypoint

import flows.pipeline
from cli import main as cli_main
from flows.params import RECIPE, PipelineConfigError, PipelineParams, load_params
from gptflow.storage import sha256_file

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"
# The end-to-end test checks the wiring, reuse and reruns, none of which depends on how long a stage trains or on
# how many rows an export measures: on top of configs/tiny.yaml it trains fewer steps, the classifier's last block
# only on shorter texts, and the LM export measures perplexity and agreement on 8 rows (the three LM exports were
# half the test's time).
QUICK = {
    "pretrain": {"steps": 6, "eval_every": 3, "checkpoint_every": 3},
    "classifier": {"max_length": 48, "trainable": "last_k"},
    "instruct": {"max_steps": 4, "batch_size": 4},
    "export": {"max_eval_rows": 8},
}


def test_defaults_and_overrides():
    params = load_params(TINY, preset="tiny")
    assert params.pretrain.preset == "tiny" and params.corpus == "the-verdict"
    assert params.pretrain.steps == 20 and params.classifier.epochs == 1
    assert PipelineParams().pretrain.preset == "mini"
    assert params.merged({"weights": "gpt2:gpt2-small"}).gpt2_source == "gpt2-small"


def test_the_recipe_file_is_the_default_of_cli_flow_and_nightly_deployment(monkeypatch, settings):
    recipe = PipelineParams()
    assert recipe.merged(yaml.safe_load(RECIPE.read_text())) == recipe  # every value of the file is a default
    assert load_params() == recipe == inspect.signature(flows.pipeline.pipeline.fn).parameters["params"].default
    used = []
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda p: used.append(p) or {"report": "", "deliverables": {}})
    assert cli_main(["pipeline"]) == 0 and used == [recipe]  # `gptflow pipeline`, i.e. `make run`
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    (nightly,) = [d for d in deployments if d["name"] == "nightly"]
    flow = load_flow_from_entrypoint(str(REPO / nightly["entrypoint"]))
    # the recipe, with the deployment's time limit (a flow decorator cannot take it from parameters)
    assert flow.validate_parameters(nightly["parameters"]) == {"params": recipe.merged({"timeout_minutes": 240})}
    # A run's partial parameters change only what they name; the rest stays the recipe.
    steps = flow.validate_parameters({"params": {"pretrain": {"steps": 50}}})["params"]
    assert steps == recipe.merged({"pretrain": {"steps": 50}}) and steps.pretrain.preset == "mini"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "weights: gpt3\n",
            "weights: Value error, expected 'pretrain', 'gpt2:<name-or-path>' or 'hf:<repo-or-folder>', got 'gpt3'",
        ),
        ("pretrain: {steps: 0}\n", "pretrain.steps: Input should be greater than 0"),
        ("pretrain: {preset: huge}\n", "pretrain.preset: unknown model preset 'huge'; presets: gpt2-small"),
        ("classifier: {epochz: 3}\n", "classifier.epochz: Extra inputs are not permitted"),
        ("- 1\n- 2\n", "holds a list, not a mapping of config fields"),
        ("a: [1\n", "is not valid YAML/JSON"),
    ],
)
def test_bad_config_files_name_the_field(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(
        PipelineConfigError,
        match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"),
    ) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_cli_rejects_bad_config_before_any_work(tmp_path, settings, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("export: {max_int8_drop: -1}\n")
    assert cli_main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gptflow pipeline: error: ") and "export.max_int8_drop" in err[-1]
    assert not settings.home.exists()  # validated before any stage ran


def _stage_status(summary: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in summary["stages"]}


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_reuse_then_downstream_rerun(prefect_harness, settings, fake_ollama, monkeypatch):
    from flows.pipeline import pipeline

    monkeypatch.setenv("OLLAMA_HOST", fake_ollama.host)  # where a new LM champion is published
    params = load_params(TINY).merged(
        {**QUICK, "judge": {"host": "http://127.0.0.1:9", "retries": 0}, "promotion": {"ollama_model": "gptflow-tiny"}}
    )
    first = pipeline(params)

    deliverables = {k: Path(v) for k, v in first["deliverables"].items()}
    bundle = deliverables["edge bundle"]
    assert sorted(p.name for p in bundle.iterdir()) == [
        "card.md",
        "encoder.json",
        "labels.json",
        "manifest.json",
        "model.int8.onnx",
        "model.onnx",
        "vocab.bpe",
    ]
    lm_bundle = deliverables["LM edge bundle"]
    lm_manifest = json.loads((lm_bundle / "manifest.json").read_text())
    assert lm_manifest["kind"] == "lm" and lm_manifest["prompt"]["style"] == "alpaca"
    assert {"model.onnx", "model.int8.onnx", "genai_config.json", "card.md"} <= set(lm_manifest["files"])
    assert "LM edge bundle" in Path(first["report"]).read_text()
    gguf_bundle = deliverables["GGUF bundle (llama.cpp, Ollama)"]
    assert sorted(p.name for p in gguf_bundle.iterdir()) == ["Modelfile", "card.md", "manifest.json", "model.gguf"]
    gguf_manifest = json.loads((gguf_bundle / "manifest.json").read_text())
    assert (gguf_manifest["quant"], gguf_manifest["prompt_style"], gguf_manifest["family"]) == (
        "q8_0",
        "alpaca",
        "gpt2",
    )
    assert gguf_bundle.parent.parent == lm_bundle.parent.parent  # next to the ONNX bundle: <home>/export/
    responses = json.loads(deliverables["test responses"].read_text())
    assert len(responses) == 4 and all("model_response" in r for r in responses)
    report = Path(first["report"])
    assert report.parent.parent == settings.home / "runs" and "## Lineage" in report.read_text()
    status = _stage_status(first)
    assert status["evaluate"] == "skipped"  # no judge reachable: skipped with the reason, not failed
    assert all(
        status[s] == "done"
        for s in ("data-classifier", "base-model", "classifier", "export", "instruct", "export-lm", "inspect-base")
    )
    assert first["data"] == "every input is pinned by sha256"
    assert [(s["role"], s["status"]) for s in first["sources"]] == [
        ("classifier", "pinned"),
        ("instructions", "pinned"),
        ("corpus", "pinned"),
    ]
    promoted = first["promotions"]
    assert {k: (p["registry"], p["status"], p["champion"]) for k, p in promoted.items()} == {
        "classifier": ("classifier-spam", "promoted", "v0001"),
        "lm": ("lm-instructions", "promoted", "v0001"),
    }
    assert promoted["lm"]["ollama"]["published"] and promoted["lm"]["ollama"]["model"] == "gptflow-tiny"
    create = fake_ollama.requests_to("/api/create")[-1].body
    assert create["model"] == "gptflow-tiny" and create["files"] == {
        "model.gguf": "sha256:" + gguf_manifest["files"]["model.gguf"]
    }
    assert create["template"].startswith("Below is an instruction") and create["parameters"]["stop"] == [
        "<|endoftext|>"
    ]
    assert "published as gptflow-tiny" in report.read_text()
    champion = settings.home / "registry" / "classifier-spam" / "champion"
    assert json.loads((champion / "manifest.json").read_text()) == json.loads((bundle / "manifest.json").read_text())
    assert (
        promoted["lm"]["verdict"]["metric"] == "val_perplexity" and promoted["lm"]["challenger"]["val_perplexity"] > 1
    )
    assert "## Champion vs challenger" in report.read_text()
    inspection = json.loads((deliverables["instruction model inspection"].parent / "report.json").read_text())
    assert inspection["kind"] == "lm" and inspection["text"] == params.probe_text
    assert (deliverables["base model inspection"].parent / "logit_lens.png").is_file()

    checkpoint = deliverables["classifier checkpoint"]
    mtime = checkpoint.stat().st_mtime_ns
    second = pipeline(params)
    status = _stage_status(second)
    assert all(
        status[s] == "reused"
        for s in (
            "data-classifier",
            "data-instructions",
            "base-model",
            "classifier",
            "export",
            "instruct",
            "export-lm",
            "export-gguf",
            "inspect-base",
            "inspect-instruct",
        )
    ), status
    assert checkpoint.stat().st_mtime_ns == mtime
    assert {k: (p["status"], p["verdict"]["reason"]) for k, p in second["promotions"].items()} == {
        "classifier": ("kept", "the challenger is the champion v0001 (same bundle)"),
        "lm": ("kept", "the challenger is the champion v0001 (same bundle)"),
    }
    assert second["promotions"]["lm"]["ollama"] == {"published": False, "reason": "the champion v0001 was kept"}
    assert len(fake_ollama.requests_to("/api/create")) == 1

    # A new LM bundle with a judge that answers: judged against the champion's answers, both orders.
    judged = {"instruct": {"max_steps": QUICK["instruct"]["max_steps"] + 2}, "judge": {"host": fake_ollama.host}}
    third = pipeline(params.merged(judged))
    status = _stage_status(third)
    assert status["instruct"] == status["export-lm"] == status["inspect-instruct"] == "done"
    assert status["evaluate"] == "completed"
    lm = third["promotions"]["lm"]
    assert lm["champion_before"] == "v0001" and lm["champion"] == ("v0002" if lm["status"] == "promoted" else "v0001")
    assert lm["verdict"]["metric"] == "pairwise_win_rate"
    row = lm["pairwise"]["row"]
    assert row["wins"] + row["ties"] + row["losses"] + row["unjudged"] == 4
    low = float(row["95% CI"].strip("[]").split(",")[0].rstrip("%")) / 100
    assert (lm["status"] == "promoted") == (low > 0.5)
    assert lm["metrics"]["champion"]["val_perplexity"] == promoted["lm"]["challenger"]["val_perplexity"]  # kept
    # The champion answered from its bundle's fp32 decoder exactly as the instruct stage answered with PyTorch.
    (champion_answers,) = (settings.home / "bundle-responses").glob("*/test_responses.json")
    assert json.loads(champion_answers.read_text()) == responses
    assert "judged pairwise (A: this run's model, B: the champion)" in Path(third["report"]).read_text()
    assert all(
        status[s] == "reused" for s in ("data-classifier", "base-model", "classifier", "export", "inspect-base")
    ), status

    # The base model rewritten in place (as when its stage's code changes and it re-finishes from its final
    # checkpoint): the stages built on it train afresh in new folders, never resume checkpoints of old weights.
    (base_dir,) = [p.parent for p in (settings.home / "pretrain").glob("*/model.pt")]
    weights = torch.load(base_dir / "model.pt", weights_only=True)
    weights["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights["model"].items()}
    torch.save(weights, base_dir / "model.pt")
    manifest = json.loads((base_dir / "manifest.json").read_text())
    manifest["outputs"]["model.pt"] = sha256_file(base_dir / "model.pt")
    (base_dir / "manifest.json").write_text(json.dumps(manifest))
    fourth = pipeline(params)
    status = _stage_status(fourth)
    assert status["base-model"] == "reused" and status["classifier"] == status["instruct"] == "done", status
    assert fourth["promotions"]["lm"]["verdict"]["reason"].startswith("no judge for a pairwise decision (Ollama is")
    assert Path(fourth["deliverables"]["classifier checkpoint"]) != checkpoint
