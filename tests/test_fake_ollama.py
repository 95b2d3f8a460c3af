"""The fake Ollama's pairwise judge, per-model replies, the "garble" fault and flaky mode, through the real client:
the pairwise evaluation's tests rely on them, so they are pinned here first."""

from __future__ import annotations

import functools
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import pytest
from fake_judges import (
    default_reply,
    overlap_score,
    pairwise_in_prompt,
    pairwise_verdict,
    prefer_first_position,
    word_overlap,
)
from fake_ollama import GARBLED, FakeOllama

from eval.judge import judge_prompt, parse_score
from eval.pairwise import VERDICT_SCHEMA, pairwise_prompt, parse_verdict

ENTRY = {"instruction": "Who wrote Pride and Prejudice?", "input": "", "output": "Jane Austen wrote it."}
RIGHT, WRONG = "Jane Austen wrote it.", "Charles Dickens."
AB, BA = pairwise_prompt(ENTRY, RIGHT, WRONG), pairwise_prompt(ENTRY, WRONG, RIGHT)


@functools.cache
def client(host: str) -> ollama.Client:
    """One client per fake server: making one costs more than a request to it."""
    return ollama.Client(host=host, timeout=5)


def chat(fake: FakeOllama, prompt: str, model: str = "llama3", format: dict | None = VERDICT_SCHEMA) -> str:
    """One judge request as eval.judge sends it (temperature 0, no stream); the reply's content."""
    response = client(fake.host).chat(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        format=format,
        options={"temperature": 0},
        stream=False,
    )
    return response["message"]["content"]


def test_pairwise_prompt_is_parsed_and_judged_by_word_overlap():
    assert pairwise_in_prompt(AB) == ("Jane Austen wrote it.", RIGHT, WRONG)
    assert pairwise_in_prompt(judge_prompt({**ENTRY, "model_response": RIGHT}, "model_response")) is None
    assert (pairwise_verdict(AB), pairwise_verdict(BA)) == ("A", "B")
    assert pairwise_verdict(pairwise_prompt(ENTRY, WRONG, WRONG)) == "tie"
    assert (word_overlap("", ""), word_overlap("a b", "B c"), word_overlap("x", "")) == (1.0, 1 / 3, 0.0)


def test_score_prompts_are_answered_as_before():
    """The refactor onto word_overlap keeps the score judge's numbers (5 shared words of 8 -> 62)."""
    prompt = judge_prompt(
        {**ENTRY, "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."},
        "model_response",
    )
    assert overlap_score(prompt) == 62
    assert (default_reply(prompt, None), default_reply(prompt, {"type": "object"})) == ("62", '{"score": 62}')
    assert prefer_first_position(prompt, None) == "62"


def test_verdicts_over_the_wire_in_both_orders_and_forms(fake_ollama):
    assert json.loads(chat(fake_ollama, AB)) == {
        "explanation": "Response A shares more words with the reference.",
        "verdict": "A",
    }
    assert parse_verdict(chat(fake_ollama, BA)) == ("B", None)
    free = chat(fake_ollama, AB, format=None)
    assert free == "Response A shares more words with the reference. [[A]]"
    assert parse_verdict(free) == ("A", None)
    assert parse_verdict(chat(fake_ollama, BA, format=None)) == ("B", None)
    tie = pairwise_prompt(ENTRY, RIGHT, RIGHT)
    assert chat(fake_ollama, tie, format=None).endswith("[[C]]")
    assert parse_verdict(chat(fake_ollama, tie, format=None)) == parse_verdict(chat(fake_ollama, tie)) == ("tie", None)


def test_model_replies_give_a_second_judge_position_bias(fake_ollama):
    """judge-b says "A" whatever the order (asked by its untagged name); llama3 keeps judging on the content."""
    fake_ollama.models.append("judge-b:latest")
    fake_ollama.model_replies["judge-b:latest"] = prefer_first_position
    assert [parse_verdict(chat(fake_ollama, p, model="judge-b"))[0] for p in (AB, BA)] == ["A", "A"]
    assert chat(fake_ollama, BA, model="judge-b:latest", format=None).endswith("[[A]]")
    assert [parse_verdict(chat(fake_ollama, p))[0] for p in (AB, BA)] == ["A", "B"]


def test_garble_is_a_complete_reply_without_a_verdict_or_score(fake_ollama):
    fake_ollama.fail_next("garble", "garble")
    reply = chat(fake_ollama, AB)
    assert reply == GARBLED and parse_verdict(reply)[0] is None and parse_score(reply)[0] is None
    parts = list(client(fake_ollama.host).chat(model="llama3", messages=[{"role": "user", "content": AB}], stream=True))
    assert "".join(p["message"]["content"] for p in parts) == GARBLED and parts[-1]["done"]
    assert parse_verdict(chat(fake_ollama, AB)) == ("A", None)  # the queue is empty again


def drawn(prompt: str, k: int, share: float = 0.5, seed: int = 0, model: str = "llama3:latest") -> str | None:
    """The flaky fault the spec assigns to the k-th request for (model, prompt), computed independently here."""
    h = hashlib.sha256(f"{seed}|{model}|{prompt}|{k}".encode()).hexdigest()
    return ("cut", "garble")[int(h[8:16], 16) % 2] if int(h[:8], 16) / 2**32 < share else None


PROMPTS = [pairwise_prompt({**ENTRY, "instruction": f"Question {i}?"}, RIGHT, WRONG) for i in range(40)]


def outcome(fake: FakeOllama, prompt: str) -> str:
    """What the client saw: "cut" (the transport failed), "garble" (no verdict) or the verdict."""
    try:
        reply = chat(fake, prompt)
    except httpx.TransportError:
        return "cut"
    return parse_verdict(reply)[0] or "garble"


def faulted(seed: int, threads: int = 1) -> dict[str, str]:
    with FakeOllama() as fake:
        fake.flaky(0.5, seed=seed)
        with ThreadPoolExecutor(threads) as pool:
            seen = dict(zip(PROMPTS, pool.map(lambda p: outcome(fake, p), PROMPTS)))
        got = {p: o for p, o in seen.items() if o != "A"}
        assert fake.flaky_served == {f: list(got.values()).count(f) for f in ("cut", "garble")}
        return got


def test_flaky_is_deterministic_per_model_prompt_and_k():
    first = faulted(seed=0)
    assert first == {p: f for p in PROMPTS if (f := drawn(p, 0))}  # exactly the spec's draw
    assert 10 < len(first) < 30 and set(first.values()) == {"cut", "garble"}
    assert faulted(seed=0, threads=8) == first  # interleaving changes nothing
    assert faulted(seed=1).keys() != first.keys()


def test_flaky_second_ask_is_a_fresh_draw_and_queued_faults_come_first(fake_ollama):
    fake_ollama.flaky(0.5)
    [cut] = [p for p in PROMPTS if drawn(p, 0) == "cut" and drawn(p, 1) is None][:1]
    with pytest.raises(httpx.TransportError):
        chat(fake_ollama, cut)
    assert parse_verdict(chat(fake_ollama, cut)) == ("A", None)  # k = 1 drew no fault
    assert [outcome(fake_ollama, PROMPTS[i]) for i in range(3)] == [drawn(PROMPTS[i], 0) or "A" for i in range(3)]

    fake_ollama.flaky(1.0, faults=("garble",))
    fake_ollama.fail_next("http_500")
    served = fake_ollama.flaky_served["garble"]  # counted since the fake started, across flaky() calls
    with pytest.raises(ollama.ResponseError):
        chat(fake_ollama, AB)
    assert fake_ollama.flaky_served["garble"] == served
    assert chat(fake_ollama, AB) == GARBLED and fake_ollama.flaky_served["garble"] == served + 1

    fake_ollama.flaky(0.0)
    assert parse_verdict(chat(fake_ollama, AB)) == ("A", None)
    with pytest.raises(ValueError, match="unknown fault"):
        fake_ollama.flaky(0.5, faults=("boom",))
