"""A loopback stand-in for the Ollama REST API, for tests that run the real `ollama` client.

It implements the documented subset the judge uses (https://github.com/ollama/ollama/blob/main/docs/api.md):
`POST /api/chat` (NDJSON stream or one JSON object), `POST /api/generate`, `GET /api/tags`,
`GET /api/version`, `POST /api/show`, `POST /api/pull`. Replies are scripted with `reply(prompt, format)`;
faults queued with `fail_next(...)` hit the next chat/generate requests one each:

  "http_500"   HTTP 500 with an error body
  "not_found"  HTTP 404 `{"error": "model 'x' not found"}`
  "slow"       answers only after `slow_s` seconds (set it beyond the client's timeout)
  "cut"        a stream (or body) cut mid-way: the connection closes before the reply is complete

Unknown models get the 404 too. `closed_port_host()` gives a host where the connection is refused.
Every request is recorded in `requests` (method, path, JSON body) so tests can assert what was sent.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

FAULTS = ("http_500", "not_found", "slow", "cut")
_RESPONSE_IN_PROMPT = re.compile(r"score the model response `(.*)` on a scale", re.S)
_OUTPUT_IN_PROMPT = re.compile(r"and correct output `(.*)`, score the model response", re.S)


def response_in_prompt(prompt: str) -> str:
    """The model response quoted in a judge prompt (what a scripted reply usually depends on)."""
    return _RESPONSE_IN_PROMPT.search(prompt).group(1)


def overlap_score(prompt: str) -> int:
    """Default scripted judge: word overlap (Jaccard x 100) of the model response with the correct output."""
    response, output = _RESPONSE_IN_PROMPT.search(prompt), _OUTPUT_IN_PROMPT.search(prompt)
    if not response or not output:
        return 0
    a, b = set(response.group(1).lower().split()), set(output.group(1).lower().split())
    return round(100 * len(a & b) / len(a | b)) if a | b else 100


def default_reply(prompt: str, format: Any) -> str:
    """What a well-behaved judge says: JSON when a format schema was asked for, else the bare integer."""
    score = overlap_score(prompt)
    return json.dumps({"score": score}) if format else str(score)


@dataclass
class Recorded:
    method: str
    path: str
    body: dict | None


class FakeOllama:
    def __init__(self, models: tuple[str, ...] = ("llama3:latest",), slow_s: float = 2.0):
        self.models = list(models)
        self.slow_s = slow_s
        self.reply: Callable[[str, Any], str] = default_reply
        self.requests: list[Recorded] = []
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # clients hang up on slow/cut replies
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-ollama", daemon=True
        )

    @property
    def host(self) -> str:
        return "http://127.0.0.1:%d" % self._server.server_address[1]

    def __enter__(self) -> "FakeOllama":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail_next(self, *faults: str) -> None:
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        with self._lock:
            self._faults.extend(faults)

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- used by the handler ------------------------------------------------------------------------------
    def _record(self, method: str, path: str, body: dict | None) -> None:
        with self._lock:
            self.requests.append(Recorded(method, path, body))

    def _next_fault(self) -> str | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _knows(self, model: str) -> bool:
        name = model if ":" in model else model + ":latest"
        return name in self.models


def closed_port_host() -> str:
    """A loopback address nobody listens on: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


_CREATED_AT = "2024-06-01T12:00:00.000000Z"


def _make_handler(fake: FakeOllama):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as Ollama serves them

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -- plumbing ---------------------------------------------------------------------------------
        def _body(self) -> dict | None:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def _send_json(self, obj: dict, status: int = 200) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_stream(self, parts: list[dict], cut: bool = False) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i, part in enumerate(parts):
                line = (json.dumps(part) + "\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                if cut and i == 0:  # hang up after the first part, without the terminating chunk
                    self.wfile.flush()
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")

        def _not_found(self, model: str) -> None:
            self._send_json({"error": f"model '{model}' not found"}, status=404)

        # -- routes -----------------------------------------------------------------------------------
        def do_GET(self) -> None:
            fake._record("GET", self.path, None)
            if self.path == "/api/version":
                self._send_json({"version": "0.6.5"})
            elif self.path == "/api/tags":
                self._send_json(
                    {
                        "models": [
                            {
                                "name": m,
                                "model": m,
                                "modified_at": _CREATED_AT,
                                "size": 4_661_224_676,
                                "digest": "365c0bd3c000" + "0" * 52,
                                "details": {
                                    "format": "gguf",
                                    "family": "llama",
                                    "parameter_size": "8.0B",
                                    "quantization_level": "Q4_0",
                                },
                            }
                            for m in fake.models
                        ]
                    }
                )
            else:
                self._send_json({"error": "404 page not found"}, status=404)

        def do_POST(self) -> None:
            body = self._body()
            fake._record("POST", self.path, body)
            model = (body or {}).get("model", "")
            if self.path == "/api/show":
                if not fake._knows(model):
                    return self._not_found(model)
                self._send_json(
                    {
                        "modelfile": f"FROM {model}",
                        "parameters": "",
                        "template": "{{ .Prompt }}",
                        "details": {"format": "gguf", "family": "llama"},
                        "model_info": {},
                        "modified_at": _CREATED_AT,
                    }
                )
            elif self.path == "/api/pull":
                fake.models.append(model if ":" in model else model + ":latest")
                statuses = [
                    {"status": "pulling manifest"},
                    {"status": "verifying sha256 digest"},
                    {"status": "success"},
                ]
                if body.get("stream", True):
                    self._send_stream(statuses)
                else:
                    self._send_json(statuses[-1])
            elif self.path in ("/api/chat", "/api/generate"):
                self._answer(body, chat=self.path == "/api/chat")
            else:
                self._send_json({"error": "404 page not found"}, status=404)

        def _answer(self, body: dict, chat: bool) -> None:
            model = body.get("model", "")
            fault = fake._next_fault()
            if fault == "not_found" or not fake._knows(model):
                return self._not_found(model)
            if fault == "http_500":
                return self._send_json({"error": "llama runner process has terminated: exit status 2"}, 500)
            if fault == "slow" and fake._stopping.wait(fake.slow_s):
                return
            prompt = body["messages"][-1]["content"] if chat else body.get("prompt", "")
            text = fake.reply(prompt, body.get("format"))
            cut = fault == "cut"

            def part(content: str, done: bool) -> dict:
                out = {"model": model, "created_at": _CREATED_AT, "done": done}
                if chat:
                    out["message"] = {"role": "assistant", "content": content}
                else:
                    out["response"] = content
                if done:
                    out.update(done_reason="stop", total_duration=1_000_000, eval_count=len(text.split()))
                return out

            if body.get("stream", True):
                pieces = [text[i : i + 3] for i in range(0, len(text), 3)] or [""]
                self._send_stream([part(p, False) for p in pieces] + [part("", True)], cut=cut)
            elif cut:  # promise a longer body than is sent, then hang up
                data = json.dumps(part(text, True)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
            else:
                self._send_json(part(text, True))

    return Handler
