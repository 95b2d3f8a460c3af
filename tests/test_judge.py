"""The Ollama judge, run with the real `ollama` client against the loopback fake server (tests/fake_ollama.py)."""

from __future__ import annotations

import threading

import httpx
import ollama
import pytest
from fake_judges import response_in_prompt
from fake_ollama import closed_port_host

from eval.judge import (
    SCORE_SCHEMA,
    JudgeConfig,
    JudgementCache,
    JudgeOptions,
    JudgeUnavailable,
    OllamaJudge,
    judge_prompt,
    parse_score,
)

ENTRY = {
    "instruction": "Rewrite the sentence using a simile.",
    "input": "The car is very fast.",
    "output": "The car is as fast as lightning.",
    "model_response": "The car is as fast as a bullet.",
}
BOOK_PROMPT = (
    "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\n"
    "The car is very fast.` and correct output `The car is as fast as lightning.`, score the model response "
    "`The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the best score. "
    "Respond with the integer number only."
)
OVERLAP = 62  # the fake's default judge: 5 shared words of 8 distinct ones, x 100, rounded


@pytest.fixture
def make_judge(fake_ollama, tmp_path):
    def make(cache: str = "cache", **config) -> OllamaJudge:
        config = {"host": fake_ollama.host, "backoff_s": 0.0, "timeout_s": 5.0, **config}
        return OllamaJudge(JudgeConfig(cache_dir=tmp_path / cache, **config))

    return make


def chats(fake) -> list[dict]:
    return [r.body for r in fake.requests_to("/api/chat")]


def test_prompt_is_the_books():
    assert judge_prompt(ENTRY, "model_response") == BOOK_PROMPT
    no_input = judge_prompt({**ENTRY, "input": ""}, "model_response")
    assert "### Input" not in no_input and "### Instruction:\nRewrite the sentence using a simile.`" in no_input


def test_sends_book_options_and_schema(fake_ollama, make_judge):
    judgement = make_judge().ask(BOOK_PROMPT)
    assert (judgement.value, judgement.reason, judgement.cached) == (OVERLAP, None, False)
    [body] = chats(fake_ollama)
    assert body["model"] == "llama3" and body["stream"] is False
    assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert body["format"] == SCORE_SCHEMA
    assert body["messages"] == [{"role": "user", "content": BOOK_PROMPT}]


def test_streaming_and_custom_options(fake_ollama, make_judge):
    judge = make_judge(stream=True, model="llama3.1:8b", options=JudgeOptions(seed=7, num_ctx=4096, top_k=1))
    fake_ollama.models.append("llama3.1:8b")
    assert judge.ask(BOOK_PROMPT).value == OVERLAP
    [body] = chats(fake_ollama)
    assert body["stream"] is True and body["model"] == "llama3.1:8b"
    assert body["options"] == {"seed": 7, "temperature": 0, "num_ctx": 4096, "top_k": 1}


@pytest.mark.parametrize(
    "reply, score, reason",
    [
        ('{"score": 85}', 85, None),
        ("85", 85, None),
        ("Score: 85\nThe response keeps the meaning.", 85, None),
        ("0", 0, None),
        ("100.", 100, None),
        ("150", None, "score out of range 0..100: 150"),
        ("-5", None, "score out of range 0..100: -5"),
        ('{"score": 101}', None, "score out of range 0..100: 101"),
        ('{"score": "85"}', None, "score not an integer: '85'"),
        ("85.5", None, "score not an integer: 85.5"),
        ("The response is excellent.", None, "no number in reply: 'The response is excellent.'"),
    ],
)
def test_parse_score(reply, score, reason):
    assert parse_score(reply) == (score, reason)


def test_score_with_extra_text_without_structured_output(fake_ollama, make_judge):
    fake_ollama.reply = lambda prompt, fmt: "Score: 85. The response is accurate but less vivid."
    judgement = make_judge(structured_output=False).ask(BOOK_PROMPT)
    assert judgement.value == 85
    assert "format" not in chats(fake_ollama)[0]


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("I would rate it highly.", "no number in reply: 'I would rate it highly.'"),
        ("150", "score out of range 0..100: 150"),
    ],
)
def test_unusable_reply_is_retried_once_then_unscored_and_cached(fake_ollama, make_judge, reply, reason):
    fake_ollama.reply = lambda prompt, fmt: reply
    judgement = make_judge().ask(BOOK_PROMPT)
    assert (judgement.value, judgement.reason, judgement.reply) == (None, reason, reply)
    assert len(chats(fake_ollama)) == 2  # the first ask and one retry
    again = make_judge().ask(BOOK_PROMPT)  # a final answer: a rerun does not ask again
    assert (again.value, again.reason, again.cached) == (None, reason, True)
    assert len(chats(fake_ollama)) == 2


def test_unusable_reply_then_a_good_one(fake_ollama, make_judge):
    replies = iter(["Great answer!", '{"score": 72}'])
    fake_ollama.reply = lambda prompt, fmt: next(replies)
    assert make_judge().ask(BOOK_PROMPT).value == 72


def test_http_500_is_retried(fake_ollama, make_judge):
    fake_ollama.fail_next("http_500", "http_500")
    assert make_judge(retries=2).ask(BOOK_PROMPT).value == OVERLAP
    assert len(chats(fake_ollama)) == 3


def test_http_500_exhausts_retries_unscored_and_not_cached(fake_ollama, make_judge):
    fake_ollama.fail_next("http_500", "http_500")
    judgement = make_judge(retries=1).ask(BOOK_PROMPT)
    assert judgement.value is None
    assert judgement.reason == (
        "request failed: HTTP 500: llama runner process has terminated: exit status 2; gave up after 2 attempts"
    )
    assert make_judge(retries=1).ask(BOOK_PROMPT).value == OVERLAP  # not cached: asked again
    assert len(chats(fake_ollama)) == 3


def test_model_not_found_during_scoring_is_not_retried(fake_ollama, make_judge):
    fake_ollama.fail_next("not_found")
    judge = make_judge(retries=3)
    with pytest.raises(JudgeUnavailable) as exc:
        judge.ask_many([BOOK_PROMPT])
    assert str(exc.value) == f"model llama3 is not available on {fake_ollama.host}; run `ollama pull llama3`"
    assert len(chats(fake_ollama)) == 1


def test_slow_server_times_out_and_retries(fake_ollama, make_judge):
    fake_ollama.slow_s = 3.0
    fake_ollama.fail_next("slow")
    assert make_judge(timeout_s=0.3, retries=1).ask(BOOK_PROMPT).value == OVERLAP
    fake_ollama.fail_next("slow")
    judgement = make_judge(cache="other", timeout_s=0.3, retries=0).ask(BOOK_PROMPT)
    assert judgement.reason == "request failed: timed out after 0.3 s; gave up after 1 attempt"
    assert len(chats(fake_ollama)) == 3


@pytest.mark.parametrize(
    "stream, detail",
    [
        (True, "incomplete chunked read"),
        (False, "peer closed connection without sending complete message body"),
    ],
)
def test_cut_reply_is_retried(fake_ollama, make_judge, stream, detail):
    fake_ollama.fail_next("cut")
    judgement = make_judge(stream=stream, retries=0).ask(BOOK_PROMPT)
    assert judgement.value is None
    assert judgement.reason.startswith("request failed: reply cut off (RemoteProtocolError: ")
    assert detail in judgement.reason
    fake_ollama.fail_next("cut")
    assert make_judge(stream=stream, retries=1).ask(BOOK_PROMPT).value == OVERLAP


def test_preflight_reports_digest(fake_ollama, make_judge):
    info = make_judge().preflight()
    assert info == {"host": fake_ollama.host, "model": "llama3", "digest": "365c0bd3c000" + "0" * 52}
    assert [r.path for r in fake_ollama.requests] == ["/api/tags", "/api/show", "/api/tags"]
    assert fake_ollama.requests[1].body == {"model": "llama3"}


def test_preflight_unreachable():
    host = closed_port_host()
    with pytest.raises(JudgeUnavailable) as exc:
        OllamaJudge(JudgeConfig(host=host, timeout_s=2)).preflight()
    assert str(exc.value) == (f"Ollama is not reachable at {host}; start it with `ollama serve` (ConnectionError)")


def test_preflight_model_missing_and_pull(fake_ollama, make_judge):
    fake_ollama.models[:] = ["mistral:latest"]
    with pytest.raises(JudgeUnavailable) as exc:
        make_judge().preflight()
    assert str(exc.value) == (
        f"model llama3 is not available on {fake_ollama.host}; run `ollama pull llama3` (or pass --pull)"
    )
    assert make_judge(pull=True).preflight()["model"] == "llama3"
    assert [r.body for r in fake_ollama.requests_to("/api/pull")] == [
        {"model": "llama3", "insecure": False, "stream": False}
    ]
    assert "llama3:latest" in fake_ollama.models


def test_server_gone_mid_evaluation_stops_and_keeps_judgements(tmp_path):
    host = closed_port_host()
    judge = OllamaJudge(JudgeConfig(host=host, retries=1, backoff_s=0, cache_dir=tmp_path))
    with pytest.raises(
        JudgeUnavailable,
        match=r"Ollama stopped answering at .*connection refused 2 times.*"
        r"rerun to resume",
    ):
        judge.ask_many([BOOK_PROMPT, BOOK_PROMPT + " "])


def test_interrupted_evaluation_resumes_and_rerun_asks_nothing(fake_ollama, make_judge):
    prompts = [
        judge_prompt({**ENTRY, "model_response": f"The car is as fast as {thing}."}, "model_response")
        for thing in ("a bullet", "lightning", "a snail", "a rocket", "a horse", "light")
    ]
    first = make_judge().ask_many(prompts[:3])  # the run that was interrupted after three judgements
    assert len(chats(fake_ollama)) == 3
    resumed = make_judge().ask_many(prompts)
    assert len(chats(fake_ollama)) == 6  # only the three missing ones were asked
    assert [j.cached for j in resumed] == [True] * 3 + [False] * 3
    assert [j.value for j in resumed[:3]] == [j.value for j in first]
    rerun = make_judge().ask_many(prompts)
    assert len(chats(fake_ollama)) == 6  # zero new chat requests
    assert [j.value for j in rerun] == [j.value for j in resumed] == [62, 100, 62, 62, 62, 71]


def test_cache_skips_a_torn_line_and_keys_on_options(fake_ollama, make_judge, tmp_path):
    make_judge().ask(BOOK_PROMPT)
    path = tmp_path / "cache" / "judgements.jsonl"
    with open(path, "a") as handle:
        handle.write('{"key": "abc", "sco')  # a crash mid-append
    assert len(JudgementCache(path)) == 1
    assert make_judge().ask(BOOK_PROMPT).cached
    make_judge(options=JudgeOptions(seed=1)).ask(BOOK_PROMPT)  # another judge setup: a new judgement
    assert len(chats(fake_ollama)) == 2


def test_concurrency_is_bounded_and_order_kept(fake_ollama, make_judge):
    limit, in_flight, peak = 3, [0], [0]
    lock, barrier = threading.Lock(), threading.Barrier(limit, timeout=10)

    def reply(prompt, fmt):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        barrier.wait()  # passes only when `limit` requests are in the server at once
        with lock:
            in_flight[0] -= 1
        return str(len(response_in_prompt(prompt)))

    fake_ollama.reply = reply
    prompts = [judge_prompt({**ENTRY, "model_response": "x" * n}, "model_response") for n in range(1, 10)]
    judgements = make_judge(concurrency=limit, retries=0).ask_many(prompts)
    assert [j.value for j in judgements] == list(range(1, 10))
    assert peak[0] == limit
    assert len(chats(fake_ollama)) == 9


def test_fake_server_speaks_the_documented_api(fake_ollama):
    client = ollama.Client(host=fake_ollama.host, timeout=5)
    assert client.generate("llama3", "score: 5", stream=False).response == "0"
    assert "".join(p.response for p in client.generate("llama3", "x", stream=True)) == "0"
    assert httpx.get(fake_ollama.host + "/api/version").json() == {"version": "0.6.5"}
    assert [m.model for m in client.list().models] == ["llama3:latest"]
    with pytest.raises(ollama.ResponseError) as exc:
        client.chat("phi3", [{"role": "user", "content": "hi"}])
    assert (exc.value.status_code, exc.value.error) == (404, "model 'phi3' not found")
