"""A loopback JSON webhook: what Apprise's `json://` URL posts to. `make e2e` points GPTFLOW_ALERT_URL at it, and
the alert tests use it to see exactly what a run sent."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertReceiver:
    """Records every request (method, path, headers, JSON body) and answers `status`; serves from construction
    until `close()` (or the end of a `with` block)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(
                    {"method": "POST", "path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                )
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def about(self, run_name: str) -> list[str]:
        """The events ("promoted", "failed", ...) of the alerts whose title names `run_name`."""
        titles = [r["json"]["title"] for r in self.requests]
        return [t.split(": ")[1] for t in titles if t.endswith(f": {run_name}")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> AlertReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
