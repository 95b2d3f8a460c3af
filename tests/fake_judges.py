"""Scripted judges for the loopback Ollama server (tests/fake_ollama.py): what a judge model would answer.

`default_reply` judges by word overlap with the reference: a score prompt (the book's, `eval.judge.judge_prompt`)
gets the overlap x 100 (`{"score": N}` with a format, else the bare integer); a pairwise prompt
(`eval.pairwise.pairwise_prompt`) gets the response with more words in common with the reference,
`{"explanation": ..., "verdict": "A" | "B" | "tie"}` with a format, else a sentence ending in [[A]], [[B]] or [[C]]
(a tie), as MT-Bench's judges answer. `prefer_first_position` is a judge with position bias: "A" for every pairwise
prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any

_RESPONSE_IN_PROMPT = re.compile(r"score the model response `(.*)` on a scale", re.S)
_OUTPUT_IN_PROMPT = re.compile(r"and correct output `(.*)`, score the model response", re.S)
_PAIRWISE_IN_PROMPT = re.compile(
    r"\[Reference answer\]\n(.*?)\n\n\[Response A\]\n(.*?)\n\[End of response A\]\n\n"
    r"\[Response B\]\n(.*?)\n\[End of response B\]\n\n",
    re.S,
)
_BRACKETED = {"A": "[[A]]", "B": "[[B]]", "tie": "[[C]]"}


def response_in_prompt(prompt: str) -> str:
    """The model response quoted in a judge prompt (what a scripted reply usually depends on)."""
    return _RESPONSE_IN_PROMPT.search(prompt).group(1)


def pairwise_in_prompt(prompt: str) -> tuple[str, str, str] | None:
    """(reference, first response, second response) of a pairwise judge prompt; None for any other prompt."""
    found = _PAIRWISE_IN_PROMPT.search(prompt)
    return (found.group(1), found.group(2), found.group(3)) if found else None


def word_overlap(a: str, b: str) -> float:
    """Jaccard similarity of the lowercased word sets (1.0 when both are empty): the fake judge's sense of quality."""
    x, y = set(a.lower().split()), set(b.lower().split())
    return len(x & y) / len(x | y) if x | y else 1.0


def overlap_score(prompt: str) -> int:
    """Default scripted judge: word overlap (Jaccard x 100) of the model response with the correct output."""
    response, output = _RESPONSE_IN_PROMPT.search(prompt), _OUTPUT_IN_PROMPT.search(prompt)
    if not response or not output:
        return 0
    return round(100 * word_overlap(response.group(1), output.group(1)))


def pairwise_verdict(prompt: str) -> str:
    """Default pairwise judge: "A" when the first response shares more words with the reference (Jaccard), "B"
    when the second does, "tie" when they share as much."""
    parts = pairwise_in_prompt(prompt)
    if parts is None:
        raise ValueError("not a pairwise judge prompt")
    reference, first, second = parts
    a, b = word_overlap(first, reference), word_overlap(second, reference)
    return "A" if a > b else "B" if a < b else "tie"


def verdict_reply(verdict: str, format: Any, explanation: str) -> str:
    """A pairwise judge's answer: JSON under the schema when a format was asked for, else MT-Bench's free text
    ending in [[A]], [[B]] or [[C]] (a tie)."""
    if format:
        return json.dumps({"explanation": explanation, "verdict": verdict})
    return f"{explanation} {_BRACKETED[verdict]}"


def default_reply(prompt: str, format: Any) -> str:
    """What a well-behaved judge says: JSON when a format schema was asked for, else the bare integer (a score
    prompt) or a sentence ending in the bracketed verdict (a pairwise prompt)."""
    if pairwise_in_prompt(prompt) is not None:
        verdict = pairwise_verdict(prompt)
        explanation = (
            "Both responses share as many words with the reference."
            if verdict == "tie"
            else f"Response {verdict} shares more words with the reference."
        )
        return verdict_reply(verdict, format, explanation)
    score = overlap_score(prompt)
    return json.dumps({"score": score}) if format else str(score)


def prefer_first_position(prompt: str, format: Any) -> str:
    """A judge with position bias: whichever response is shown first wins; other prompts get `default_reply`."""
    if pairwise_in_prompt(prompt) is None:
        return default_reply(prompt, format)
    return verdict_reply("A", format, "Response A, the first one, is better.")
