"""Fresh data: a user's file or URL checked on every run (content hash, ETag / Last-Modified), and the task's
retries of a server that fails for a while."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from gptflow.settings import load_settings
from gptflow.sources import SourceError, TransientSourceError, check_source


class _SourceHandler(http.server.BaseHTTPRequestHandler):
    """Serves `body` at any path; ETag/Last-Modified when `validators`; a status per request from `script`."""

    body = b"text,label\nhello,ham\n"
    validators = True
    script: list[int] = []
    log: list[tuple[str, int]] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'
        status = self.script.pop(0) if self.script else 200
        if status == 200 and self.validators and self.headers.get("If-None-Match") == etag:
            status = 304
        type(self).log.append((self.headers.get("If-None-Match") or "", status))
        self.send_response(status)
        if status == 200:
            if self.validators:
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", "Tue, 01 Dec 2026 10:00:00 GMT")
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body)
        else:
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def source_server():
    _SourceHandler.body, _SourceHandler.validators = b"text,label\nhello,ham\n", True
    _SourceHandler.script, _SourceHandler.log = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SourceHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", _SourceHandler
    server.shutdown()


def test_a_file_is_new_then_unchanged_then_a_new_version(tmp_path):
    settings = load_settings(home=tmp_path / "home", mirror="")
    data = tmp_path / "sms.csv"
    data.write_text("text,label\nhi,ham\n")
    first = check_source("classifier", str(data), "run-1", settings)
    assert (first.status, first.how, first.since_run) == ("new", "hash", "run-1")
    assert first.sha256 == hashlib.sha256(data.read_bytes()).hexdigest() and first.path == str(data)
    second = check_source("classifier", str(data), "run-2", settings)
    assert second.status == "unchanged" and second.since_run == "run-1"
    assert second.note.startswith("data unchanged since run run-1 (")
    data.write_text("text,label\nhi,ham\nwin cash,spam\n")
    third = check_source("classifier", str(data), "run-3", settings)
    assert (third.status, third.since_run, third.previous_sha256) == ("changed", "run-3", first.sha256)
    assert third.note == f"new data version {third.sha256[:12]} (was {first.sha256[:12]})"
    data.write_text("text,label\nhi,ham\n")  # back to the first content: a change since the last run, seen before
    fourth = check_source("classifier", str(data), "run-4", settings)
    assert (fourth.status, fourth.sha256, fourth.since_run) == ("changed", first.sha256, "run-1")


def test_pinned_sources_are_not_tracked(tmp_path):
    check = check_source("instructions", "instruction-data", "run-1", load_settings(home=tmp_path, mirror=""))
    assert (check.status, check.path, check.sha256, check.note) == (
        "pinned",
        "instruction-data",
        None,
        "pinned by sha256",
    )
    assert not (tmp_path / "sources").exists()


def test_a_missing_file_is_one_error_naming_it(tmp_path):
    with pytest.raises(SourceError, match=r"data source .*nope\.csv does not exist or is not a file"):
        check_source("classifier", str(tmp_path / "nope.csv"), "run-1", load_settings(home=tmp_path, mirror=""))


def test_a_url_is_asked_conditionally_and_downloaded_only_when_changed(tmp_path, source_server):
    base, handler = source_server
    settings = load_settings(home=tmp_path / "home", mirror="")
    url = f"{base}/exports/sms.csv?token=1"
    first = check_source("classifier", url, "run-1", settings)
    assert (first.status, first.how) == ("new", "download")
    assert first.path.endswith(f"/{first.sha256[:12]}/sms.csv")
    assert open(first.path, "rb").read() == handler.body
    second = check_source("classifier", url, "run-2", settings)
    assert (second.status, second.how, second.path, second.since_run) == ("unchanged", "ETag", first.path, "run-1")
    assert [status for _, status in handler.log] == [200, 304] and handler.log[1][0].startswith('"')

    handler.body = b"text,label\nhello,ham\nfree prize,spam\n"
    third = check_source("classifier", url, "run-3", settings)
    assert (third.status, third.how, third.previous_sha256) == ("changed", "download", first.sha256)
    assert open(third.path, "rb").read() == handler.body
    assert open(first.path, "rb").read() != handler.body  # the old version's file is kept as it was


def test_a_server_without_validators_is_hashed(tmp_path, source_server):
    base, handler = source_server
    handler.validators = False
    settings = load_settings(home=tmp_path / "home", mirror="")
    url = f"{base}/sms.csv"
    check_source("classifier", url, "run-1", settings)
    again = check_source("classifier", url, "run-2", settings)
    assert (again.status, again.how) == ("unchanged", "download")  # downloaded again, same bytes: no new version
    assert [status for _, status in handler.log] == [200, 200]


def test_a_url_from_the_mirror_is_read_there(tmp_path, mirror):
    url = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
    check = check_source("corpus", url, "run-1", load_settings(home=tmp_path, mirror=str(mirror)))
    assert check.status == "new" and check.path.startswith(str(mirror))
    assert check.sha256 == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (404, SourceError, r"HTTP 404; expected 200"),
        (503, TransientSourceError, r"HTTP 503 from the server"),
        (429, TransientSourceError, r"HTTP 429 from the server"),
    ],
)
def test_server_errors_are_permanent_or_transient(tmp_path, source_server, status, error, message):
    base, handler = source_server
    handler.script = [status]
    with pytest.raises(error, match=message):
        check_source("classifier", f"{base}/sms.csv", "run-1", load_settings(home=tmp_path, mirror=""))


def test_a_closed_port_is_transient(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientSourceError, match="ConnectError"):
        check_source("classifier", f"http://127.0.0.1:{port}/a.csv", "r", load_settings(home=tmp_path, mirror=""))


def test_the_task_retries_a_failing_server_and_not_a_missing_file(
    prefect_harness, settings, source_server, tmp_path, monkeypatch
):
    from prefect import flow

    from gptflow.settings import get_settings
    from tasks.prepare import check_data_source

    monkeypatch.setenv("GPTFLOW_MIRROR", "")  # the loopback server is the network here
    get_settings.cache_clear()

    base, handler = source_server
    handler.script = [503, 503]
    fast = check_data_source.with_options(retry_delay_seconds=0)

    @flow
    def check(ref: str) -> dict:
        return fast("classifier", ref)

    result = check(f"{base}/sms.csv")
    assert result["status"] == "new" and [s for _, s in handler.log] == [503, 503, 200]
    handler.log.clear()
    with pytest.raises(SourceError):
        check(str(tmp_path / "missing.csv"))
    handler.script = [404]
    with pytest.raises(SourceError, match="HTTP 404"):
        check(f"{base}/gone.csv")
    assert [s for _, s in handler.log] == [404]  # asked once: a 404 is not retried
