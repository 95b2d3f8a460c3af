"""A loopback stand-in for the Ollama REST API, for tests that run the real `ollama` client.

It implements the documented subset the judge and `gptflow publish` use
(https://github.com/ollama/ollama/blob/main/docs/api.md): `POST /api/chat` (NDJSON stream or one JSON object),
`POST /api/generate`, `GET /api/tags`, `GET /api/version`, `POST /api/show`, `POST /api/pull`, and the model
creation API:

  `HEAD /api/blobs/sha256:<hex>`  200 when the blob is stored, 404 when not
  `POST /api/blobs/sha256:<hex>`  reads the body (Content-Length or chunked) and stores digest -> size: 201 Created
                                  (200 when already stored); 400 `{"error": "digest mismatch, ..."}` when the body's
                                  sha256 is not the digest, 400 `invalid digest format` for a malformed digest
  `POST /api/create`              model, files {name: digest}, template, system, parameters, stream (default true),
                                  or `from` an existing model; a file whose blob is not stored is a 400 naming it;
                                  the model is then listed by /api/tags, known to /api/show (its template and
                                  parameters) and to chat/generate; the reply is `{"status": "success"}`, or with
                                  `stream` an NDJSON stream of statuses ending in success

Replies are scripted with `reply(prompt, format)`, or per model with `model_replies[tagged name]`; the default is
`fake_judges.default_reply`, a judge by word overlap with the reference (tests/fake_judges.py has it and the other
scripted judges). Faults queued with `fail_next(...)` hit the next chat/generate requests one each:

  "http_500"   HTTP 500 with an error body
  "not_found"  HTTP 404 `{"error": "model 'x' not found"}`
  "slow"       answers only after `slow_s` seconds (set it beyond the client's timeout)
  "cut"        a stream (or body) cut mid-way: the connection closes before the reply is complete
  "garble"     a complete 200 reply (streamed or not, as asked) that holds no number and no verdict

`flaky(share, faults, seed)` makes a deterministic share of chat/generate requests fail: the k-th request for a
(tagged model, prompt) pair since the call gets a fault when sha256(f"{seed}|{model}|{prompt}|{k}") says so, which
depends on neither timing nor thread interleaving; a queued fault takes precedence (that request still counts
toward k). `flaky_served` counts the flaky faults served, by name, across calls; `flaky(0.0)` turns it off.

Unknown models get the 404 too. `closed_port_host()` gives a host where the connection is refused.
Every request is recorded in `requests` (method, path, JSON body) so tests can assert what was sent; a blob upload
is recorded with `{"bytes": N}`, the byte count of its body, not the bytes. `blobs` maps each stored digest to its
size and `created` each created model's name to its create request.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from fake_judges import default_reply

FAULTS = ("http_500", "not_found", "slow", "cut", "garble")
GARBLED = "I would rather not judge this one."  # the "garble" fault's reply: no number, no verdict
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BLOBS = "/api/blobs/"


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
        self.model_replies: dict[str, Callable[[str, Any], str]] = {}  # tagged model name -> its own `reply`
        self.flaky_served: Counter[str] = Counter()  # flaky faults served, by fault name
        self.requests: list[Recorded] = []
        self.blobs: dict[str, int] = {}  # digest -> size of each stored blob
        self.created: dict[str, dict] = {}  # model name (with its tag) -> its /api/create request
        self._faults: deque[str] = deque()
        self._flaky: tuple[float, tuple[str, ...], int] = (0.0, (), 0)  # share, faults, seed
        self._asked: Counter[tuple[str, str]] = Counter()  # (tagged model, prompt) -> requests since flaky()
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

    def flaky(self, share: float, faults: tuple[str, ...] = ("cut", "garble"), seed: int = 0) -> None:
        """From now on, fail a deterministic `share` of chat/generate requests with one of `faults` each: the k-th
        request for a (model, prompt) pair since this call fails when sha256(f"{seed}|{model}|{prompt}|{k}") falls
        below the share, which depends on neither timing nor thread interleaving. `flaky(0.0)` turns it off."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, not {share!r}")
        for fault in faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        if share and not faults:
            raise ValueError("flaky needs at least one fault")
        with self._lock:
            self._flaky = (share, tuple(faults), seed)
            self._asked.clear()

    def requests_to(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # -- used by the handler ------------------------------------------------------------------------------
    def _record(self, method: str, path: str, body: dict | None) -> None:
        with self._lock:
            self.requests.append(Recorded(method, path, body))

    def _next_fault(self, model: str, prompt: str) -> str | None:
        """The queued fault, else the flaky one this request draws (each request counts toward its pair's k)."""
        with self._lock:
            share, faults, seed = self._flaky
            k = None
            if share:
                key = (_tagged(model), prompt)
                k = self._asked[key]
                self._asked[key] += 1
            if self._faults:
                return self._faults.popleft()
            if k is None:
                return None
            digest = hashlib.sha256(f"{seed}|{_tagged(model)}|{prompt}|{k}".encode()).hexdigest()
            if int(digest[:8], 16) / 2**32 >= share:
                return None
            fault = faults[int(digest[8:16], 16) % len(faults)]
            self.flaky_served[fault] += 1
            return fault

    def _reply(self, model: str, prompt: str, format: Any) -> str:
        return self.model_replies.get(_tagged(model), self.reply)(prompt, format)

    def _knows(self, model: str) -> bool:
        return _tagged(model) in self.models

    def _create(self, name: str, request: dict) -> None:
        with self._lock:
            self.created[name] = request
            if name not in self.models:
                self.models.append(name)


def _tagged(model: str) -> str:
    """A model name with its tag (`:latest` unless it names one)."""
    return model if ":" in model else model + ":latest"


def _show_created(request: dict) -> dict:
    """/api/show of a model made with /api/create: its Modelfile, template, system prompt and parameters."""
    parameters = []
    for key, value in (request.get("parameters") or {}).items():
        for one in value if isinstance(value, list) else [value]:
            parameters.append(f"{key} {json.dumps(one) if isinstance(one, str) else one}")
    lines = [f"FROM {digest}" for digest in (request.get("files") or {}).values()] or [f"FROM {request.get('from')}"]
    if request.get("template") is not None:
        lines.append(f'TEMPLATE """{request["template"]}"""')
    if request.get("system") is not None:
        lines.append(f'SYSTEM """{request["system"]}"""')
    lines += [f"PARAMETER {line}" for line in parameters]
    out = {
        "modelfile": "\n".join(lines) + "\n",
        "parameters": "\n".join(parameters),
        "template": request.get("template") or "{{ .Prompt }}",
        "details": {"format": "gguf"},
        "model_info": {},
        "modified_at": _CREATED_AT,
    }
    if request.get("system") is not None:
        out["system"] = request["system"]
    return out


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
        disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -- plumbing ---------------------------------------------------------------------------------
        def _body(self) -> dict | None:
            """The JSON body; None when there is none, or it is not JSON (an upload to a wrong path, say)."""
            data = b"".join(self._body_pieces())
            try:
                return json.loads(data) if data else None
            except ValueError:
                return None

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
                self._send_json({"models": [self._tag(m) for m in fake.models]})
            else:
                self._send_json({"error": "404 page not found"}, status=404)

        def _tag(self, name: str) -> dict:
            """A model's entry in /api/tags: a created one's size is its blobs', its digest its request's hash."""
            request = fake.created.get(name)
            if request is None:
                size, digest, family = 4_661_224_676, "365c0bd3c000" + "0" * 52, "llama"
                details = {"parameter_size": "8.0B", "quantization_level": "Q4_0"}
            else:
                size = sum(fake.blobs.get(d, 0) for d in (request.get("files") or {}).values())
                digest, family, details = (
                    hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest(),
                    "",
                    {},
                )
            return {
                "name": name,
                "model": name,
                "modified_at": _CREATED_AT,
                "size": size,
                "digest": digest,
                "details": {"format": "gguf", "family": family, **details},
            }

        def do_HEAD(self) -> None:
            fake._record("HEAD", self.path, None)
            if not self.path.startswith(_BLOBS):
                status = 404
            elif not _DIGEST.fullmatch(digest := self.path[len(_BLOBS) :]):
                status = 400
            else:
                status = 200 if digest in fake.blobs else 404
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            if self.path.startswith(_BLOBS):
                return self._upload_blob(self.path[len(_BLOBS) :])
            body = self._body()
            fake._record("POST", self.path, body)
            model = (body or {}).get("model", "")
            if self.path == "/api/show":
                if not fake._knows(model):
                    return self._not_found(model)
                request = fake.created.get(_tagged(model))
                if request is not None:
                    return self._send_json(_show_created(request))
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
            elif self.path == "/api/create":
                self._create(body or {})
            elif self.path == "/api/pull":
                fake.models.append(_tagged(model))
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

        def _upload_blob(self, digest: str) -> None:
            """Ollama's blob upload: the body's sha256 must be the digest; 201 Created (200 when already stored)."""
            sha256, size = hashlib.sha256(), 0
            for piece in self._body_pieces():
                sha256.update(piece)
                size += len(piece)
            fake._record("POST", self.path, {"bytes": size})
            if not _DIGEST.fullmatch(digest):
                return self._send_json({"error": "invalid digest format"}, status=400)
            found = f"sha256:{sha256.hexdigest()}"
            if found != digest:
                return self._send_json({"error": f'digest mismatch, expected "{digest}", got "{found}"'}, status=400)
            with fake._lock:
                stored = digest in fake.blobs
                fake.blobs[digest] = size
            self.send_response(200 if stored else 201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _body_pieces(self):
            """The raw request body, piece by piece: Content-Length bytes, or a chunked body."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    yield self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                    pass
                return
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                piece = self.rfile.read(min(left, 1 << 16))
                if not piece:
                    return
                left -= len(piece)
                yield piece

        def _create(self, body: dict) -> None:
            """Ollama's /api/create from blobs (`files`) or from an existing model (`from`)."""
            name, files, source = body.get("model"), body.get("files"), body.get("from")
            if not isinstance(name, str) or not name:
                return self._send_json({"error": "invalid model name"}, status=400)
            if not files and not source:
                return self._send_json({"error": "neither 'from' or 'files' was specified"}, status=400)
            if source and not fake._knows(source):
                return self._not_found(source)
            if files is not None and not isinstance(files, dict):
                return self._send_json({"error": "files must map each file name to its blob digest"}, status=400)
            for file, digest in (files or {}).items():
                if not isinstance(digest, str) or digest not in fake.blobs:
                    error = f"blob {digest} of file {file!r} not found: upload it with POST /api/blobs/{digest} first"
                    return self._send_json({"error": error}, status=400)
            if not isinstance(body.get("parameters", {}), dict):
                return self._send_json({"error": "parameters must be an object"}, status=400)
            fake._create(_tagged(name), body)
            statuses = [{"status": "parsing GGUF"}] if files else []
            statuses += [{"status": f"using existing layer {d}"} for d in (files or {}).values()]
            statuses += [{"status": "writing manifest"}, {"status": "success"}]
            if body.get("stream", True):
                self._send_stream(statuses)
            else:
                self._send_json(statuses[-1])

        def _answer(self, body: dict, chat: bool) -> None:
            model = body.get("model", "")
            prompt = ((body.get("messages") or [{}])[-1].get("content") or "") if chat else body.get("prompt", "")
            fault = fake._next_fault(model, prompt)
            if fault == "not_found" or not fake._knows(model):
                return self._not_found(model)
            if fault == "http_500":
                return self._send_json({"error": "llama runner process has terminated: exit status 2"}, 500)
            if fault == "slow" and fake._stopping.wait(fake.slow_s):
                return
            text = GARBLED if fault == "garble" else fake._reply(model, prompt, body.get("format"))
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
