"""Settings, mirror-aware downloads and the GPT-2 tokenizer."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from gptflow.download import DownloadError, Member, extract_member, fetch, fetch_source, url_relpath
from gptflow.settings import SettingsError, load_settings
from gptflow.tokenizer import EOT_ID, encode

VERDICT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"


def test_settings_defaults_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("GPTFLOW_MIRROR", raising=False)
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    s = load_settings()
    assert s.mirror is None and s.home == Path("outputs") and s.ollama_host == "http://localhost:11434"
    monkeypatch.setenv("OLLAMA_HOST", "judge.local:9999")
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    s = load_settings()
    assert s.ollama_host == "http://judge.local:9999" and s.home == tmp_path


def test_settings_errors_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFLOW_MIRROR", str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match=r"GPTFLOW_MIRROR: .*does not exist"):
        load_settings()
    monkeypatch.delenv("GPTFLOW_MIRROR")
    monkeypatch.setenv("GPTFLOW_DOWNLOAD_RETRIES", "many")
    with pytest.raises(SettingsError, match="GPTFLOW_DOWNLOAD_RETRIES"):
        load_settings()


def test_a_validation_error_reads_as_one_line():
    from pydantic import BaseModel, Field, ValidationError, model_validator

    from gptflow.errors import validation_message

    class Inner(BaseModel):
        n: int = Field(gt=0)

    class Outer(BaseModel):
        inner: Inner
        name: str

        @model_validator(mode="after")
        def _named(self) -> "Outer":
            raise ValueError("never valid")

    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"inner": {"n": 0}})
    assert validation_message(info.value) == "inner.n: Input should be greater than 0; name: Field required"
    assert validation_message(info.value, lambda loc: f"--{loc[0]}").startswith("--inner: Input should be greater")
    with pytest.raises(ValidationError) as info:
        Outer(inner=Inner(n=1), name="x")
    assert validation_message(info.value, whole="outer") == "outer: Value error, never valid"


def test_url_layout():
    assert url_relpath("https://a.example/x/y.txt") == Path("a.example/x/y.txt")
    with pytest.raises(DownloadError, match="not an http"):
        url_relpath("ftp://a/b")


def test_mirror_fetch_opens_no_socket(settings, no_network, mirror):
    for name in ["instruction-data", "the-verdict", "tinyshakespeare", "gpt2-encoder", "gpt2-vocab"]:
        path = fetch_source(name, settings)
        assert path.is_relative_to(mirror)
    spam = fetch_source("sms-spam", settings)
    assert spam.name == "SMSSpamCollection" and spam.stat().st_size == 477907
    assert spam.is_relative_to(settings.home)  # extracted into the download cache, not the mirror


def test_mirror_missing_file_names_expected_path(settings, mirror, no_network):
    with pytest.raises(DownloadError, match=str(mirror / "example.org/missing.txt")):
        fetch("https://example.org/missing.txt", settings=settings)


def test_mirror_hash_mismatch(settings):
    with pytest.raises(DownloadError, match="sha256 mismatch .*expected 0{64}"):
        fetch(VERDICT, sha256="0" * 64, settings=settings)


def test_extract_member_rejects_wrong_member(tmp_path, settings):
    zip_path = fetch("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip", settings=settings)
    with pytest.raises(DownloadError, match="no member 'nope'"):
        extract_member(zip_path, Member("nope", "0" * 64, 1), tmp_path)


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves BODY; the first `fail_first` requests get HTTP 503."""

    body = b"hello mirror-less world\n"
    fail_first = 0
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server API)
        type(self).requests += 1
        if self.path == "/missing":
            self.send_error(404)
            return
        if type(self).requests <= type(self).fail_first:
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    _FlakyHandler.requests = 0
    _FlakyHandler.fail_first = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _FlakyHandler
    server.shutdown()


def test_network_download_retries_verifies_and_caches(tmp_path, http_server, monkeypatch):
    base, handler = http_server
    monkeypatch.setattr("gptflow.download.time.sleep", lambda s: None)
    handler.fail_first = 2
    s = load_settings(home=tmp_path, mirror="", download_retries=3)
    digest = hashlib.sha256(handler.body).hexdigest()
    path = fetch(f"{base}/data/file.txt", sha256=digest, settings=s)
    assert path.read_bytes() == handler.body and handler.requests == 3
    assert path == tmp_path / "downloads" / f"127.0.0.1:{base.rsplit(':', 1)[1]}" / "data/file.txt"
    assert not path.with_name("file.txt.part").exists()
    fetch(f"{base}/data/file.txt", sha256=digest, settings=s)
    assert handler.requests == 3  # verified cache hit: no second download


def test_network_download_hash_mismatch_deletes_partial(tmp_path, http_server):
    base, _ = http_server
    s = load_settings(home=tmp_path, mirror="", download_retries=0)
    with pytest.raises(DownloadError, match=r"expected f{64}, got [0-9a-f]{64}"):
        fetch(f"{base}/x.txt", sha256="f" * 64, settings=s)
    assert [p.name for p in (tmp_path / "downloads").rglob("x.txt*")] == ["x.txt.lock"]  # no partial, no file


def test_network_404_is_not_retried(tmp_path, http_server, monkeypatch):
    base, handler = http_server
    s = load_settings(home=tmp_path, mirror="", download_retries=5)
    with pytest.raises(DownloadError, match="after 1 attempt"):
        fetch(f"{base}/missing", settings=s)
    assert handler.requests == 1


def test_tokenizer_known_ids(tokenizer):
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert encode(tokenizer, "<|endoftext|>") == [EOT_ID]
    assert tokenizer.n_vocab == 50257


def test_the_verdict_is_5145_tokens(tokenizer, settings):
    text = fetch_source("the-verdict", settings).read_text(encoding="utf-8")
    assert len(text) == 20479
    assert len(tokenizer.encode(text)) == 5145


def test_cli_rejects_bad_setting_at_start_up(monkeypatch, tmp_path, capsys):
    from cli import main
    from gptflow.settings import get_settings

    monkeypatch.setenv("GPTFLOW_MIRROR", str(tmp_path / "missing"))
    get_settings.cache_clear()
    assert main(["data", "spam"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptflow data: error: invalid settings: GPTFLOW_MIRROR: ") and "\n" not in err
    get_settings.cache_clear()


def test_stage_lock_makes_a_second_writer_wait(tmp_path):
    import threading
    import time

    from gptflow.storage import stage_lock

    order: list[str] = []
    first_in = threading.Event()

    def first():
        with stage_lock(tmp_path / "stage"):
            order.append("first in")
            first_in.set()
            time.sleep(0.3)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with stage_lock(tmp_path / "stage"):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    from gptflow.storage import atomic_dir

    final = tmp_path / "bundle"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_dir(final) as tmp:
            (tmp / "b.txt").write_text("two")
            raise RuntimeError("mid-write")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]  # the old folder is untouched
    with atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary or old folder left
