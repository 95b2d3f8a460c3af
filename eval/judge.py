"""An LLM judge served by Ollama: the book's chapter 7 judge (a score 0-100), hardened, and any other rubric.

What the book's judge lacked and this one adds: a preflight that asks the server (not the process table),
structured output (a JSON schema in `format`, temperature 0) with a text fallback, retries with backoff for
transient failures, a bounded thread pool, a disk cache of judgements (an interrupted evaluation resumes, a rerun
asks nothing new), and unscored items counted with their reason instead of silently dropped. A `Rubric` is what
a judge is asked for: the schema and how a reply is read (`SCORE` here; `eval.pairwise.VERDICT` compares two
responses).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx
import ollama
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptflow.errors import GptflowError
from gptflow.prompts import format_instruction
from gptflow.settings import get_settings, ollama_model_name, ollama_url
from gptflow.storage import sha256_json

log = logging.getLogger(__name__)

JUDGE_PROMPT = (
    "Given the input `{prompt}` and correct output `{output}`, score the model response `{response}`"
    " on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["score"],
}
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Rubric:
    """What a judge is asked for: the JSON schema sent as `format`, and how a reply is read into a value
    (`parse(reply)` gives (value, None) or (None, why)): JSON first, free text for judges that ignore `format`."""

    name: str
    schema: dict[str, Any]
    parse: Callable[[str], tuple[Any, str | None]]


class JudgeUnavailable(GptflowError):
    """The Ollama server cannot be reached, or it does not have the judge model."""


class JudgeOptions(BaseModel):
    """Sampling options sent inside `options` (the book's values: reproducible, greedy)."""

    model_config = ConfigDict(extra="allow")  # any other Ollama option passes through

    seed: int = 123
    temperature: float = 0.0
    num_ctx: int = 2048


class JudgeConfig(BaseModel):
    host: str = Field(default_factory=lambda: get_settings().ollama_host, description="Ollama server URL.")
    model: str = Field(default_factory=lambda: get_settings().judge_model, description="Judge model.")
    options: JudgeOptions = Field(default_factory=JudgeOptions)
    structured_output: bool = Field(default=True, description="Ask for JSON under the rubric's schema.")
    stream: bool = Field(default=False, description="Read the reply as an NDJSON stream.")
    timeout_s: float = Field(default=120.0, gt=0, description="Per request (connect/read/write).")
    retries: int = Field(default=3, ge=0, description="Extra attempts on timeouts, HTTP 5xx, dropped links.")
    backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each attempt.")
    unusable_retries: int = Field(default=1, ge=0, description="Re-asks when a reply holds no valid score.")
    concurrency: int = Field(default=1, ge=1, description="Requests in flight at once.")
    pull: bool = Field(default=False, description="Pull the judge model when the server lacks it.")
    cache_dir: Path | None = Field(default=None, description="Judgement cache; default HOME/judge-cache.")

    @field_validator("host")
    @classmethod
    def _host_is_a_url(cls, value: str) -> str:
        return ollama_url(value)

    @field_validator("model")
    @classmethod
    def _model_is_a_name(cls, value: str) -> str:
        return ollama_model_name(value)

    def identity(self, rubric: Rubric | None = None) -> dict[str, Any]:
        """What decides a judgement (the cache key and stage fingerprint use it; host and timing do not)."""
        return {
            "model": self.model,
            "options": self.options.model_dump(),
            "format": (rubric or SCORE).schema if self.structured_output else None,
        }

    def panel(self, models: Iterable[str] | None) -> list["JudgeConfig"]:
        """This judge with each of `models` instead of its own (several judges, one setup); itself when None."""
        models = list(dict.fromkeys(models or []))
        return [self.model_copy(update={"model": ollama_model_name(m)}) for m in models] or [self]


@dataclass(frozen=True)
class Judgement:
    value: Any  # the rubric's reading of the reply (a score, a verdict); None when there is none
    reply: str
    reason: str | None = None  # why there is no value
    cached: bool = False


def judge_prompt(entry: dict, response_key: str) -> str:
    return JUDGE_PROMPT.format(prompt=format_instruction(entry), output=entry["output"], response=entry[response_key])


def json_field(reply: str, key: str) -> tuple[bool, Any]:
    """(True, value) when the reply is a JSON object holding `key` (a judge that honoured `format`), else
    (False, None)."""
    try:
        obj = json.loads(reply)
    except json.JSONDecodeError:
        return False, None
    return (True, obj[key]) if isinstance(obj, dict) and key in obj else (False, None)


def parse_score(reply: str) -> tuple[int | None, str | None]:
    """(score, None) or (None, why): JSON `{"score": n}` first, else the first number in the text."""
    text = reply.strip()
    found, value = json_field(text, "score")
    if not found:
        match = _NUMBER.search(text)
        if match is None:
            return None, f"no number in reply: {clip(text)!r}"
        value = float(match.group())
        value = int(value) if value.is_integer() else value
    if not isinstance(value, int) or isinstance(value, bool):
        return None, f"score not an integer: {value!r}"
    if not 0 <= value <= 100:
        return None, f"score out of range 0..100: {value}"
    return value, None


SCORE = Rubric("score", SCORE_SCHEMA, parse_score)


def clip(text: str, n: int = 60) -> str:
    """`text` cut to `n` characters with an ellipsis: a reply quoted in a one-line reason."""
    return text if len(text) <= n else text[: n - 3] + "..."


class JudgementCache:
    """Judgements on disk, one JSON line each, keyed by sha256 of (judge identity, prompt).

    Appends are single `write` calls under a lock; a line torn by a crash is skipped on load.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, Judgement] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    value = rec["value"] if "value" in rec else rec["score"]  # "score": caches before rubrics
                    self._entries[rec["key"]] = Judgement(value, rec["reply"], rec["reason"], cached=True)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Judgement | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, judgement: Judgement) -> None:
        line = (
            json.dumps({"key": key, "value": judgement.value, "reply": judgement.reply, "reason": judgement.reason})
            + "\n"
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
            self._entries[key] = Judgement(judgement.value, judgement.reply, judgement.reason, cached=True)


class _IncompleteStream(Exception):
    """The NDJSON stream ended without its final `done` message."""


class _RequestFailed(Exception):
    """A request failed for good: retries spent, or an error not worth retrying."""


class _ServerGone(Exception):
    """The server refused connections through every retry: stop asking."""


class OllamaJudge:
    def __init__(self, config: JudgeConfig, cache: JudgementCache | None = None, rubric: Rubric = SCORE):
        self.config = config
        self.rubric = rubric
        self.client = ollama.Client(host=config.host, timeout=config.timeout_s)
        cache_dir = config.cache_dir or get_settings().home / "judge-cache"
        self.cache = cache if cache is not None else JudgementCache(cache_dir / "judgements.jsonl")
        self.requests_sent = 0
        self._count_lock = threading.Lock()

    # -- preflight -------------------------------------------------------------------------------------
    def preflight(self) -> dict[str, Any]:
        """Ask the server whether it answers and has the model (pulling it if allowed); return its details."""
        host, model = self.config.host, self.config.model
        try:
            self.client.list()
            try:
                self.client.show(model)
            except ollama.ResponseError as exc:
                if exc.status_code != 404:
                    raise
                if not self.config.pull:
                    raise JudgeUnavailable(
                        f"model {model} is not available on {host}; run `ollama pull {model}` (or pass --pull)"
                    ) from None
                log.info("pulling %s on %s", model, host)
                self.client.pull(model)
                self.client.show(model)
            listed = {m.model: m for m in self.client.list().models}
        except (ConnectionError, httpx.TransportError) as exc:
            raise JudgeUnavailable(
                f"Ollama is not reachable at {host}; start it with `ollama serve` ({type(exc).__name__})"
            ) from None
        except ollama.ResponseError as exc:
            raise JudgeUnavailable(f"Ollama at {host} answered the preflight with an error: {exc}") from None
        tagged = listed.get(model) or listed.get(model + ":latest")
        return {"host": host, "model": model, "digest": tagged.digest if tagged else None}

    # -- judging ---------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return self.config.identity(self.rubric)

    def cache_key(self, prompt: str) -> str:
        return sha256_json({**self.identity(), "prompt": prompt})

    def ask(self, prompt: str) -> Judgement:
        key = self.cache_key(prompt)
        if (hit := self.cache.get(key)) is not None:
            return hit
        reason = None
        for _ in range(1 + self.config.unusable_retries):
            try:
                reply = self._ask(prompt)
            except _RequestFailed as exc:  # unscored but not cached: a rerun asks again
                return Judgement(None, "", f"request failed: {exc}")
            value, reason = self.rubric.parse(reply)
            if value is not None:
                break
        judgement = Judgement(value, reply, reason)
        self.cache.put(key, judgement)  # usable or not, the reply is final for this prompt and judge
        return judgement

    def ask_many(self, prompts: Iterable[str]) -> list[Judgement]:
        """Judge prompts with at most `concurrency` in flight; results in input order.

        If the server stops accepting connections, the rest are not attempted: JudgeUnavailable is raised
        and the judgements made so far stay in the cache for the next run.
        """
        prompts = list(prompts)
        unique = list(dict.fromkeys(prompts))  # identical prompts are asked once
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge") as pool:
            futures = {p: pool.submit(self.ask, p) for p in unique}
            try:
                return [futures[p].result() for p in prompts]
            except BaseException as exc:
                pool.shutdown(wait=True, cancel_futures=True)
                if isinstance(exc, _ServerGone):
                    raise JudgeUnavailable(
                        f"Ollama stopped answering at {self.config.host} ({exc}); the judgements made so far "
                        f"are cached in {self.cache.path}: rerun to resume"
                    ) from None
                raise

    def _ask(self, prompt: str) -> str:
        """One judgement request, retried with exponential backoff on transient failures."""
        attempts = 1 + self.config.retries
        for attempt in range(attempts):
            try:
                return self._chat(prompt)
            except ollama.ResponseError as exc:
                if exc.status_code == 404:
                    raise JudgeUnavailable(
                        f"model {self.config.model} is not available on {self.config.host}; "
                        f"run `ollama pull {self.config.model}`"
                    ) from None
                if exc.status_code != -1 and exc.status_code < 500:  # a bad request: asking again won't help
                    raise _RequestFailed(f"HTTP {exc.status_code}: {exc.error}") from None
                error = f"HTTP {exc.status_code}: {exc.error}" if exc.status_code > 0 else f"stream error: {exc.error}"
            except ConnectionError:
                if attempt == attempts - 1:
                    raise _ServerGone(f"connection refused {attempts} times") from None
                error = "connection refused"
            except httpx.TimeoutException:
                error = f"timed out after {self.config.timeout_s:g} s"
            except (httpx.TransportError, json.JSONDecodeError, _IncompleteStream) as exc:
                error = f"reply cut off ({type(exc).__name__}: {exc})"
            if attempt < attempts - 1:
                delay = self.config.backoff_s * 2**attempt
                log.warning(
                    "judge request failed (%s); retry %d/%d in %.1f s", error, attempt + 1, self.config.retries, delay
                )
                time.sleep(delay)
        raise _RequestFailed(f"{error}; gave up after {attempts} attempt{'s' * (attempts > 1)}")

    def _chat(self, prompt: str) -> str:
        with self._count_lock:
            self.requests_sent += 1
        kwargs = dict(
            model=self.config.model,
            messages=[{"role": "user", "content": prompt}],
            options=self.config.options.model_dump(),
            format=self.rubric.schema if self.config.structured_output else None,
        )
        if not self.config.stream:
            return self.client.chat(**kwargs, stream=False).message.content or ""
        parts, done = [], False
        try:
            for chunk in self.client.chat(**kwargs, stream=True):
                parts.append(chunk.message.content or "")
                done = bool(chunk.done)
        except httpx.ConnectError:  # the streaming path does not translate it into ConnectionError
            raise ConnectionError("connection refused") from None
        if not done:
            raise _IncompleteStream("the stream ended before its final `done` message")
        return "".join(parts)
