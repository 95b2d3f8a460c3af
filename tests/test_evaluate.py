"""The evaluation report, the evaluate flow (Prefect harness) and `gptflow evaluate`, against the fake Ollama."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from fake_judges import response_in_prompt
from fake_ollama import closed_port_host

from cli import main
from eval.judge import JudgeConfig, JudgeUnavailable, OllamaJudge
from eval.report import ResponsesFileError, evaluate_responses, load_responses

ENTRIES = [
    {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
        "model_response": "The car is as fast as a bullet.",
        "baseline": "The car is fast.",
    },
    {
        "instruction": "What type of cloud is typically associated with thunderstorms?",
        "input": "",
        "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
        "model_response": "A thunderstorm cloud is a cumulonimbus.",
        "baseline": "Clouds.",
    },
    {
        "instruction": "Name the author of 'Pride and Prejudice'.",
        "input": "",
        "output": "Jane Austen.",
        "model_response": "Jane Austen.",
        "baseline": "Jane Austen.",
    },
    {
        "instruction": "Convert 45 kilometers to meters.",
        "input": "",
        "output": "45 kilometers is 45000 meters.",
        "model_response": "45 kilometers is 4500 meters.",
        "baseline": "I do not know.",
    },
]
# What the scripted judge says about each response: one reply is unusable twice, so that item is unscored.
REPLIES = {
    "The car is as fast as a bullet.": '{"score": 85}',
    "The car is fast.": '{"score": 60}',
    "A thunderstorm cloud is a cumulonimbus.": "Score: 90 (accurate)",
    "Clouds.": '{"score": 10}',
    "Jane Austen.": '{"score": 100}',
    "45 kilometers is 4500 meters.": "The conversion is wrong.",
    "I do not know.": '{"score": 0}',
}


@pytest.fixture
def responses(tmp_path, fake_ollama):
    fake_ollama.reply = lambda prompt, fmt: REPLIES[response_in_prompt(prompt)]
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(ENTRIES))
    return path


def test_report_two_fields(responses, fake_ollama, settings, tmp_path):
    out = tmp_path / "report"
    judge = OllamaJudge(JudgeConfig(host=fake_ollama.host, concurrency=2, backoff_s=0))
    summary = evaluate_responses(
        load_responses(responses, ["model_response", "baseline"]),
        ["model_response", "baseline"],
        judge,
        out,
        source=str(responses),
    )
    model, base = summary["fields"]["model_response"], summary["fields"]["baseline"]
    assert (model["n_scored"], model["n_unscored"], model["mean"], model["median"]) == (3, 1, 275 / 3, 90.0)
    assert model["unscored"] == [{"index": 3, "reason": "no number in reply: 'The conversion is wrong.'"}]
    assert model["unscored_reasons"] == {"no number in reply": 1}
    assert (base["n_scored"], base["n_unscored"], base["mean"], base["median"]) == (4, 0, 42.5, 35.0)
    assert base["std"] == pytest.approx(math.sqrt(6475 / 3), abs=1e-12)  # sample std of 60, 10, 100, 0
    assert base["ci95"][0] <= 42.5 <= base["ci95"][1]
    paired = summary["paired"]
    assert (paired["n"], paired["n_excluded"], paired["mean_diff"]) == (3, 1, (25 + 80 + 0) / 3)
    assert (paired["wins"], paired["ties"], paired["losses"]) == (2, 1, 0)
    assert summary["requests_sent"] == 8  # 7 distinct prompts (one is shared) + one retry of the unusable reply
    assert settings.home.joinpath("judge-cache", "judgements.jsonl").is_file()

    rows = list(csv.DictReader(open(out / "scores.csv", encoding="utf-8")))
    assert [r["model_response_score"] for r in rows] == ["85", "90", "100", ""]
    assert rows[3]["model_response_unscored_reason"] == "no number in reply: 'The conversion is wrong.'"
    assert json.loads((out / "summary.json").read_text())["fields"]["baseline"]["mean"] == 42.5
    report = (out / "report.md").read_text()
    assert "| model_response | 3 | 1 | 91.67 | 90.00 |" in report
    assert "- entry 3: no number in reply: 'The conversion is wrong.'" in report
    assert "wins/ties/losses 2/1/0" in report
    for key in ("model_response", "baseline"):
        assert (out / f"hist-{key}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("[{", "not valid JSON"),
        ('{"a": 1}', "expected a non-empty JSON list of entries, got a JSON dict"),
        ("[]", "got an empty list"),
        ('[{"instruction": "i", "output": "o", "model_response": "r"}, 3]', "entry 1 is a int, expected an object"),
        (
            '[{"instruction": "i", "output": "o", "model_response": "r"}, {"instruction": "i", "output": "o"}]',
            "entry 1 has no 'model_response' key (expected instruction, output, model_response; found instruction, "
            "output)",
        ),
        ('[{"instruction": "i", "output": 5, "model_response": "r"}]', "entry 0: 'output' must be a string, got int"),
    ],
)
def test_bad_responses_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResponsesFileError) as exc:
        load_responses(path, ["model_response"])
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_flow_scores_publishes_and_rerun_reuses(prefect_harness, responses, fake_ollama, settings):
    from prefect.artifacts import Artifact

    from flows.evaluate import evaluate_responses_flow

    judge = JudgeConfig(host=fake_ollama.host, backoff_s=0)
    outcome = evaluate_responses_flow(str(responses), ["model_response"], judge)
    assert outcome.status == "completed" and outcome.reason is None
    assert outcome.summary["fields"]["model_response"]["n_unscored"] == 1
    out = settings.home / "evaluate"
    assert [p.parent for p in out.glob("responses-*/manifest.json")] == [Path(outcome.out_dir)]
    table = Artifact.get("evaluation-summary")
    assert table.type == "table" and "91.67" in table.data
    assert Artifact.get("evaluation-histogram-model-response").type == "markdown"

    asked = len(fake_ollama.requests)
    again = evaluate_responses_flow(str(responses), ["model_response"], judge)
    assert again.summary == outcome.summary and len(fake_ollama.requests) == asked  # the stage was done


def test_flow_skips_when_judge_unreachable(prefect_harness, responses, settings):
    from prefect.artifacts import Artifact

    from flows.evaluate import evaluate_responses_flow

    host = closed_port_host()
    outcome = evaluate_responses_flow(str(responses), judge=JudgeConfig(host=host, timeout_s=2))
    assert outcome.status == "skipped"
    assert outcome.reason == f"Ollama is not reachable at {host}; start it with `ollama serve` (ConnectionError)"
    report = (settings.home / "evaluate").glob("*/report.md").__next__().read_text()
    assert f"**Skipped**: {outcome.reason}" in report
    assert not list((settings.home / "evaluate").glob("*/manifest.json"))  # nothing recorded as done
    assert "Skipped" in Artifact.get("evaluation-report").data
    with pytest.raises(JudgeUnavailable, match="not reachable"):
        evaluate_responses_flow(str(responses), judge=JudgeConfig(host=host, timeout_s=2), require_judge=True)


def test_cli_evaluate(prefect_harness, responses, fake_ollama, settings, capsys, tmp_path):
    rc = main(
        [
            "evaluate",
            str(responses),
            "--host",
            fake_ollama.host,
            "--response-key",
            "model_response",
            "--response-key",
            "baseline",
            "--concurrency",
            "2",
            "--out-dir",
            str(tmp_path / "cli"),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    lines = captured.out.splitlines()
    assert lines[0].split() == ["judge", "field", "scored", "unscored", "mean", "median", "std", "95%", "CI"]
    assert lines[1].split()[:6] == ["llama3", "model_response", "3", "1", "91.67", "90.00"]
    assert lines[2].split()[:7] == ["llama3", "baseline", "4", "0", "42.50", "35.00", "46.46"]
    assert "wins/ties/losses 2/1/0" in lines[3]
    assert lines[-1] == f"report: {tmp_path / 'cli'}/report.md"


def test_cli_errors_are_one_line(responses, tmp_path, capsys):
    rc = main(["evaluate", str(responses), "--response-key", "nope"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"gptflow evaluate: error: {responses}: entry 0 has no 'nope' key")
    host = closed_port_host()
    assert main(["evaluate", str(responses), "--host", host, "--require-judge"]) == 2
    assert capsys.readouterr().err == (
        f"gptflow evaluate: error: Ollama is not reachable at {host}; start it with `ollama serve` (ConnectionError)\n"
    )
    assert main(["evaluate", str(responses), "--concurrency", "0"]) == 2
    assert "--concurrency: Input should be greater than or equal to 1" in capsys.readouterr().err
