"""Pairwise judging (both orders, a flip is a tie), its statistics, agreement between judges and the pairwise
promotion rule, with the real `ollama` client against the loopback server (tests/fake_ollama.py), whose judge
prefers the response sharing more words with the reference."""

from __future__ import annotations

import csv
import json

import pytest
from fake_judges import overlap_score, pairwise_in_prompt, prefer_first_position

from cli import main
from eval.champion import PairwiseRule, decide_pairwise
from eval.judge import JudgeConfig, OllamaJudge
from eval.pairwise import VERDICT, compare_responses, load_pair, pairwise_prompt, parse_verdict
from eval.report import ResponsesFileError
from eval.stats import cohen_kappa

ENTRIES = [
    ("Name the author of 'Pride and Prejudice'.", "", "Jane Austen wrote Pride and Prejudice."),
    ("Convert 45 kilometers to meters.", "", "45 kilometers is 45000 meters."),
    ("What is the capital of France?", "", "The capital of France is Paris."),
    ("Rewrite the sentence using a simile.", "The car is fast.", "The car is as fast as lightning."),
]
A = ["Jane Austen wrote it.", "45 kilometers is 45000 meters.", "Paris.", "The car is as fast as a cheetah."]
B = ["Charles Dickens.", "It is 4500 meters.", "The capital of France is Paris.", "The car is as fast as a cheetah."]


def write(path, responses, order=None):
    rows = [
        {"instruction": i, "input": x, "output": o, "model_response": r} for (i, x, o), r in zip(ENTRIES, responses)
    ]
    path.write_text(json.dumps([rows[k] for k in order] if order else rows))
    return path


@pytest.fixture
def files(tmp_path):
    return write(tmp_path / "a.json", A), write(tmp_path / "b.json", B, order=[2, 0, 3, 1])  # B in another order


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"explanation": "A is right.", "verdict": "A"}', ("A", None)),
        ('{"explanation": "", "verdict": "tie"}', ("tie", None)),
        ('{"verdict": "both"}', (None, "verdict not A, B or tie: 'both'")),
        ("Assistant B follows the reference. [[B]]", ("B", None)),
        ("[[A]] at first, but on reflection [[C]]", ("tie", None)),
        (" b. ", ("B", None)),
        ("I cannot say.", (None, "no verdict in reply: 'I cannot say.'")),
    ],
)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


def test_prompt_shows_reference_and_both_responses_in_order():
    entry = dict(zip(("instruction", "input", "output"), ENTRIES[3]))
    prompt = pairwise_prompt(entry, "first one", "second one")
    assert "### Input:\nThe car is fast.\n\n[Reference answer]\nThe car is as fast as lightning.\n\n" in prompt
    assert prompt.index("[Response A]\nfirst one\n[End of response A]") < prompt.index("[Response B]\nsecond one\n")


def test_pairs_are_matched_by_instruction_and_input(files, tmp_path):
    pairs = load_pair(*files, "model_response", "model_response")
    assert [(p["a"], p["b"]) for p in pairs] == list(zip(A, B))
    a, b = files
    write(tmp_path / "short.json", B[:3])
    with pytest.raises(ResponsesFileError) as missing:
        load_pair(a, tmp_path / "short.json", "model_response", "model_response")
    assert str(missing.value) == (
        f"{tmp_path / 'short.json'}: no entry for instruction 'Rewrite the sentence using a simile.' (input "
        f"'The car is fast.') of {a} entry 3: both files must answer the same instructions"
    )
    with pytest.raises(
        ResponsesFileError, match=r"a.json entry 3: instruction 'Rewrite the sentence using a simile.' is"
    ):
        load_pair(tmp_path / "short.json", a, "model_response", "model_response")
    other = json.loads(b.read_text())
    other[0]["output"] = "Paris."
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ResponsesFileError, match=r"other.json entry 0: its reference output differs from .*a.json "):
        load_pair(a, tmp_path / "other.json", "model_response", "model_response")


def test_both_orders_counts_interval_and_report(files, fake_ollama, settings, tmp_path):
    judge = OllamaJudge(JudgeConfig(host=fake_ollama.host, backoff_s=0), rubric=VERDICT)
    out = tmp_path / "report"
    summary = compare_responses(
        load_pair(*files, "model_response", "model_response"), judge, out, {"a": "a.json", "b": "b.json"}
    )
    assert [(r["verdict_ab"], r["verdict_ba"], r["outcome"]) for r in summary["rows"]] == [
        ("A", "A", "win"),
        ("A", "A", "win"),
        ("B", "B", "loss"),
        ("tie", "tie", "tie"),  # the same response: one prompt, asked once
    ]
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n_unjudged"]) == (2, 1, 1, 0)
    assert summary["win_rate"] == 0.625 and summary["ci95"] == [0.25, 1.0]  # seed 123, 10,000 resamples
    assert summary["standard_error"] == pytest.approx(0.2394, abs=1e-4)
    assert summary["length_controlled_win_rate"] == pytest.approx(0.6280, abs=1e-4)
    assert (summary["position_bias_rate"], summary["mean_length_a"], summary["mean_length_b"]) == (0.0, 22.25, 24.25)
    assert summary["requests_sent"] == 7
    sent = [r.body for r in fake_ollama.requests_to("/api/chat")]
    assert all(b["format"] == VERDICT.schema and b["options"]["temperature"] == 0.0 for b in sent)
    rows = list(csv.DictReader(open(out / "pairs.csv", encoding="utf-8")))
    assert [r["outcome"] for r in rows] == ["win", "win", "loss", "tie"] and rows[2]["b"] == B[2]
    assert json.loads(rows[0]["reply_ab"])["verdict"] == "A"
    report = (out / "report.md").read_text()
    assert "| llama3 | 2 | 1 | 1 | 0 | 62.5% | [25.0%, 100.0%] | 62.8% | 0.0% | 22.2 | 24.2 |" in report


def test_text_fallback_gives_the_same_verdicts(files, fake_ollama, tmp_path):
    judge = OllamaJudge(JudgeConfig(host=fake_ollama.host, structured_output=False, cache_dir=tmp_path), rubric=VERDICT)
    summary = compare_responses(
        load_pair(*files, "model_response", "model_response"), judge, tmp_path, {"a": "a", "b": "b"}
    )
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 1)
    assert all(r.body.get("format") is None for r in fake_ollama.requests_to("/api/chat"))
    assert summary["judge"]["format"] is None


def test_position_biased_judge_gives_ties_and_full_position_bias(files, fake_ollama, tmp_path):
    fake_ollama.model_replies["llama3:latest"] = prefer_first_position
    judge = OllamaJudge(JudgeConfig(host=fake_ollama.host, cache_dir=tmp_path), rubric=VERDICT)
    summary = compare_responses(
        load_pair(*files, "model_response", "model_response"), judge, tmp_path, {"a": "a", "b": "b"}
    )
    # "A" in both orders means A once and B once: every verdict flips, so every pair is a tie
    assert [(r["verdict_ab"], r["verdict_ba"], r["outcome"]) for r in summary["rows"]] == [("A", "B", "tie")] * 4
    assert (summary["position_bias_rate"], summary["flipped"], summary["win_rate"]) == (1.0, 4, 0.5)
    assert summary["ci95"] == [0.5, 0.5] and summary["length_controlled_win_rate"] == pytest.approx(0.5)


def prefer_shorter(prompt: str, format) -> str:
    """A judge with the opposite of verbosity bias: the shorter response wins, equal lengths tie."""
    _, first, second = pairwise_in_prompt(prompt)
    verdict = "A" if len(first) < len(second) else "B" if len(second) < len(first) else "tie"
    return json.dumps({"explanation": "Shorter is better.", "verdict": verdict})


def test_cli_three_judges_kappa_and_rerun(prefect_harness, files, fake_ollama, settings, tmp_path, capsys):
    fake_ollama.models += ["fair:latest", "biased:latest", "terse:latest"]
    fake_ollama.model_replies["biased:latest"] = prefer_first_position
    fake_ollama.model_replies["terse:latest"] = prefer_shorter
    out = tmp_path / "cli"
    judges = ["--judge", "fair", "--judge", "biased", "--judge", "terse"]
    argv = ["evaluate", "--pairwise", *map(str, files), "--host", fake_ollama.host, *judges, "--out-dir", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:7] == ["judge", "wins", "ties", "losses", "unjudged", "win", "rate"]
    assert lines[1].split()[:9] == ["fair", "2", "1", "1", "0", "62.5%", "[25.0%,", "100.0%]", "62.8%"]
    assert lines[2].split()[:8] == ["biased", "0", "4", "0", "0", "50.0%", "[50.0%,", "50.0%]"]
    assert lines[3].split()[:8] == ["terse", "1", "1", "2", "0", "37.5%", "[0.0%,", "75.0%]"]
    assert [line.split()[:9] for line in lines[-3:]] == [
        ["fair", "vs", "biased", "outcome", "4", "0", "25.0%", "0.000", "none"],
        ["fair", "vs", "terse", "outcome", "4", "0", "25.0%", "-0.091", "none"],
        ["biased", "vs", "terse", "outcome", "4", "0", "25.0%", "0.000", "none"],
    ]
    summary = json.loads((out / "fair" / "summary.json").read_text())
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 1)
    agreement = json.loads((out / "agreement" / "agreement.json").read_text())
    assert agreement["pairs"][1]["kappa"] == pytest.approx(-1 / 11)  # observed 1/4, chance 5/16
    from prefect.artifacts import Artifact

    table = Artifact.get("pairwise-fair")  # the result row of each judge, and the kappas, in the UI
    assert table.type == "table" and "62.5%" in table.data and "[25.0%, 100.0%]" in table.data
    assert Artifact.get("pairwise-terse-pairs").type == "table" and "-0.091" in Artifact.get("judge-agreement").data
    asked = len(fake_ollama.requests_to("/api/chat"))
    assert main(argv) == 0  # every stage done: nothing asked again
    assert len(fake_ollama.requests_to("/api/chat")) == asked


def test_dropped_and_garbled_replies_are_retried_then_counted(files, fake_ollama, tmp_path):
    """A fixed share of replies is cut mid-stream or garbled (a seeded draw per prompt and attempt): a cut is
    retried, a garbled reply is asked again once, and what stays unusable is counted, not dropped."""
    fake_ollama.flaky(0.5, seed=3)
    config = JudgeConfig(host=fake_ollama.host, backoff_s=0, retries=1, unusable_retries=1, cache_dir=tmp_path)
    pairs = load_pair(*files, "model_response", "model_response")
    summary = compare_responses(pairs, OllamaJudge(config, rubric=VERDICT), tmp_path, {"a": "a", "b": "b"})
    assert dict(fake_ollama.flaky_served) == {"cut": 7, "garble": 3}
    assert [r["outcome"] for r in summary["rows"]] == ["win", None, None, "tie"]
    assert [u["reason"].split(" (")[0] for u in summary["unjudged"]] == [
        "A first: request failed: reply cut off",  # cut twice: not cached, asked again by the next run
        "A first: no verdict in reply: 'I would rather not judge this one.'",  # garbled twice: a final answer
    ]
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n_unjudged"]) == (1, 1, 0, 2)
    assert summary["win_rate"] == 0.75 and summary["ci95"] == [0.5, 1.0]
    again = compare_responses(pairs, OllamaJudge(config, rubric=VERDICT), tmp_path, {"a": "a", "b": "b"})
    # Only the failed request is asked again (garbled once more, then answered); every other verdict is cached.
    assert [r["outcome"] for r in again["rows"]] == ["win", "win", None, "tie"] and again["requests_sent"] == 2


def test_single_answer_grading_with_two_judges_reports_weighted_kappa(prefect_harness, files, fake_ollama, settings):
    from flows.evaluate import evaluate_responses_flow

    fake_ollama.models.append("harsh:latest")  # the default judge's overlap score, halved
    fake_ollama.model_replies["harsh:latest"] = lambda prompt, fmt: json.dumps({"score": overlap_score(prompt) // 2})
    judge = JudgeConfig(host=fake_ollama.host, backoff_s=0)
    outcome = evaluate_responses_flow(str(files[0]), judge=judge, judge_models=["llama3", "harsh"])
    scores = [r.summary["fields"]["model_response"]["scores"] for r in outcome.panel]
    assert scores == [[43, 100, 17, 62], [21, 50, 8, 31]]
    (pair,) = outcome.agreement["pairs"]
    assert (pair["judges"], pair["compared"], pair["n"], pair["weights"]) == (
        ["llama3", "harsh"],
        "model_response",
        4,
        "quadratic",
    )
    assert pair["kappa"] == pytest.approx(cohen_kappa(*scores, weights="quadratic")) and 0 < pair["kappa"] < 1


@pytest.mark.parametrize(
    "wins, ties, losses, margin, decision, alert",
    [
        (9, 1, 0, 0.0, "promote", False),  # lower bound 80%
        (9, 1, 0, 0.35, "keep", False),  # not above 85%
        (5, 0, 5, 0.0, "keep", False),
        (0, 1, 9, 0.0, "keep", True),  # the champion answers clearly better
    ],
)
def test_pairwise_rule(wins, ties, losses, margin, decision, alert):
    from eval.pairwise import pairwise_stats

    rows = [
        {"index": i, "outcome": o, "consistent": True, "length_a": 10, "length_b": 10, "reason": None, "from_cache": 0}
        for i, o in enumerate(["win"] * wins + ["tie"] * ties + ["loss"] * losses)
    ]
    verdict = decide_pairwise(pairwise_stats(rows), PairwiseRule(margin=margin))
    assert (verdict.decision, verdict.alert, verdict.metric) == (decision, alert, "pairwise_win_rate")
    assert verdict.challenger == pytest.approx((wins + ties / 2) / 10)
    assert verdict.champion == pytest.approx(1 - verdict.challenger)


def test_pairwise_rule_without_verdicts_keeps_the_champion():
    from eval.pairwise import pairwise_stats

    rows = [{"index": 0, "outcome": None, "length_a": 1, "length_b": 1, "reason": "A first: request failed: x"}]
    rows[0].update(consistent=None, from_cache=False)
    verdict = decide_pairwise(pairwise_stats(rows), PairwiseRule())
    assert (verdict.decision, verdict.reason) == ("keep", "no pair got a verdict in both orders (request failed: 1)")


def test_cli_refuses_bad_pairwise_input_in_one_line(files, tmp_path, capsys):
    a, b = map(str, files)
    write(tmp_path / "short.json", B[:3])
    cases = [
        (["evaluate"], "give RESPONSES.json to score, or --pairwise A.json B.json to compare (not both)"),
        (["evaluate", a, "--pairwise", a, b], "give RESPONSES.json to score, or --pairwise A.json B.json to compare"),
        (["evaluate", "--pairwise", a, str(tmp_path / "none.json")], f"{tmp_path / 'none.json'}: no such file"),
        (["evaluate", "--pairwise", a, b, "--judge", "two words"], "--judge: 'two words' is not an Ollama model name"),
        (["evaluate", "--pairwise", a, b, "--judge", "x", "--model", "y"], "give the judge as --model or as --judge"),
        (
            ["evaluate", "--pairwise", a, b, *["--response-key", "k"] * 3],
            "--response-key: with --pairwise one for both",
        ),
        (["evaluate", "--pairwise", a, str(tmp_path / "short.json")], f"{tmp_path / 'short.json'}: no entry for"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("gptflow evaluate: error: ") and message in err and err.count("\n") == 1, err
