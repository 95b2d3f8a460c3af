"""A Hugging Face model repository fetched file by file: from the mirror (no socket), or from a loopback hub with
a gated repository, HF_TOKEN, a missing repository, and the cache that makes a second call download nothing."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

import gptflow.hub as hub
from gptflow.download import DownloadError
from gptflow.hub import fetch_model_repo, repo_id
from gptflow.settings import get_settings, load_settings

REPO = "acme/tiny-lm"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def repo_files() -> dict[str, bytes]:
    """A sharded model repository: config, index, two shards, a tokenizer, and files that are not fetched."""
    index = {"metadata": {"total_size": 16}, "weight_map": {"wte.weight": SHARDS[0], "wpe.weight": SHARDS[1]}}
    return {
        "config.json": b'{"model_type": "gpt2", "n_layer": 1}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        SHARDS[0]: b"shard one bytes!",
        SHARDS[1]: b"shard two, other",
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"model_max_length": 1024}',
        "vocab.json": b'{"a": 0}',
        "merges.txt": b"#version: 0.2\n",
        "generation_config.json": b'{"eos_token_id": 0}',
        "README.md": b"# not fetched\n",
        "pytorch_model.bin": b"not fetched either",
        "onnx/model.onnx": b"in a subfolder: not fetched",
    }


FETCHED = sorted(set(repo_files()) - {"README.md", "pytorch_model.bin", "onnx/model.onnx"})


def listing(files: dict[str, bytes], wrong_sha256: str | None = None) -> bytes:
    """The hub's recursive tree listing: LFS entries (the weights) carry their sha256, every entry its size."""
    entries: list[dict] = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": "onnx"}]
    for path, data in files.items():
        entry = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": path}
        if path.endswith((".safetensors", ".bin", ".onnx")):
            digest = hashlib.sha256(b"other bytes" if path == wrong_sha256 else data).hexdigest()
            entry["lfs"] = {"oid": digest, "size": len(data), "pointerSize": 134}
        entries.append(entry)
    return json.dumps(entries).encode()


def write_mirror(root: Path, repo: str, files: dict[str, bytes], wrong_sha256: str | None = None) -> None:
    tree = root / "huggingface.co" / "api" / "models" / repo / "tree" / "main"
    tree.parent.mkdir(parents=True)
    tree.write_bytes(listing(files, wrong_sha256))
    for path, data in files.items():
        dest = root / "huggingface.co" / repo / "resolve" / "main" / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


@pytest.fixture(autouse=True)
def no_hub_environment(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture
def fetched_urls(monkeypatch):
    """Every URL fetch_model_repo asks the download layer for."""
    urls: list[str] = []
    real = hub.fetch

    def recording(url, **kwargs):
        urls.append(url)
        return real(url, **kwargs)

    monkeypatch.setattr(hub, "fetch", recording)
    return urls


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt2", "openai-community/gpt2"),
        ("gpt2-xl", "openai-community/gpt2-xl"),
        ("distilgpt2", "distilbert/distilgpt2"),
        ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
        ("a/b/c", None),
        ("../x", None),
        ("x/..", None),
        ("a/b..c", None),
        ("", None),
        ("/x", None),
        ("x/", None),
        ("gpt3", None),  # not an alias, and no owner
        ("owner/na me", None),
        ("owner/name.git", None),
        ("./outputs/model", None),
        ("-owner/name", None),
    ],
)
def test_repo_id(name, expected):
    assert repo_id(name) == expected


def test_a_bad_name_is_one_error(tmp_path):
    with pytest.raises(DownloadError, match=r"'a/b/c' is not a Hugging Face model name"):
        fetch_model_repo("a/b/c", load_settings(home=tmp_path, mirror=""))


def test_a_sharded_repo_from_the_mirror(tmp_path, no_network, fetched_urls, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a mirror is laid out by the canonical URLs
    write_mirror(tmp_path / "mirror", REPO, repo_files())
    settings = load_settings(home=tmp_path / "home", mirror=tmp_path / "mirror")
    folder = fetch_model_repo(REPO, settings)
    assert folder == tmp_path / "mirror" / "huggingface.co" / REPO / "resolve" / "main"
    assert fetched_urls[0] == f"https://huggingface.co/api/models/{REPO}/tree/main?recursive=true"
    fetched = sorted(url.removeprefix(f"https://huggingface.co/{REPO}/resolve/main/") for url in fetched_urls[1:])
    assert fetched == FETCHED  # the weights, index, config and tokenizer files; not README, .bin or subfolders
    assert all((folder / name).is_file() for name in FETCHED)
    assert not (tmp_path / "home").exists()  # nothing cached: the mirror is read in place


def test_a_shard_that_is_not_the_listings_is_refused(tmp_path, no_network):
    write_mirror(tmp_path / "mirror", REPO, repo_files(), wrong_sha256=SHARDS[1])
    with pytest.raises(DownloadError, match=rf"sha256 mismatch for \S*{SHARDS[1]}"):
        fetch_model_repo(REPO, load_settings(home=tmp_path / "home", mirror=tmp_path / "mirror"))


def test_a_single_file_repo_and_its_refusals(tmp_path, no_network):
    files = repo_files()
    del files["model.safetensors.index.json"], files[SHARDS[0]], files[SHARDS[1]]
    write_mirror(tmp_path / "single", REPO, {**files, "model.safetensors": b"weights"})
    folder = fetch_model_repo(REPO, load_settings(home=tmp_path / "home", mirror=tmp_path / "single"))
    assert (folder / "model.safetensors").read_bytes() == b"weights"

    write_mirror(tmp_path / "bin", REPO, files)  # pytorch_model.bin only
    with pytest.raises(
        DownloadError, match=rf"^{REPO} has no safetensors weights .*pytorch_model.bin.*only safetensors"
    ):
        fetch_model_repo(REPO, load_settings(home=tmp_path / "home", mirror=tmp_path / "bin"))

    del files["config.json"]
    write_mirror(tmp_path / "noconfig", REPO, {**files, "model.safetensors": b"weights"})
    with pytest.raises(DownloadError, match=rf"{REPO} has no config.json"):
        fetch_model_repo(REPO, load_settings(home=tmp_path / "home", mirror=tmp_path / "noconfig"))


def test_an_index_naming_a_path_outside_the_repo_is_refused(tmp_path, no_network):
    files = repo_files()
    files["model.safetensors.index.json"] = json.dumps({"weight_map": {"w": "../../evil.safetensors"}}).encode()
    write_mirror(tmp_path / "mirror", REPO, files)
    with pytest.raises(DownloadError, match=r"names the shard '\.\./\.\./evil\.safetensors'"):
        fetch_model_repo(REPO, load_settings(home=tmp_path / "home", mirror=tmp_path / "mirror"))


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """A hub with REPO (public), acme/gated (files need `Bearer secret`, the listing is public) and acme/private
    (everything needs it: 401 otherwise, as the hub answers for a repository it will not show)."""

    repos: dict[str, dict[str, bytes]] = {}
    requests: list[tuple[str, str]] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        auth = self.headers.get("Authorization") or ""
        type(self).requests.append((self.path, auth))
        status, body = self.answer(self.path, auth == "Bearer secret")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer(self, path: str, authorized: bool) -> tuple[int, bytes]:
        for repo, files in self.repos.items():
            tree = f"/api/models/{repo}/tree/main?recursive=true"
            resolve = f"/{repo}/resolve/main/"
            if path != tree and not path.startswith(resolve):
                continue
            if not authorized and (repo == "acme/private" or (repo == "acme/gated" and path != tree)):
                return (401 if repo == "acme/private" or not self.headers.get("Authorization") else 403), b"{}"
            if path == tree:
                return 200, listing(files)
            name = path.removeprefix(resolve)
            return (200, files[name]) if name in files else (404, b"{}")
        return 404, b"{}"

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server(monkeypatch):
    _HubHandler.repos = {name: repo_files() for name in (REPO, "acme/gated", "acme/private")}
    _HubHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", base + "/")
    yield base, _HubHandler
    server.shutdown()


def network_settings(tmp_path, monkeypatch):
    """No mirror: the loopback hub is the network; the cache under tmp_path."""
    monkeypatch.setenv("GPTFLOW_MIRROR", "")
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    return get_settings()


def test_a_public_repo_is_downloaded_once_without_a_token(tmp_path, hub_server, monkeypatch):
    base, handler = hub_server
    settings = network_settings(tmp_path, monkeypatch)
    try:
        folder = fetch_model_repo(REPO)
    finally:
        get_settings.cache_clear()
    host = base.removeprefix("http://")
    assert folder == settings.home / "downloads" / host / REPO / "resolve" / "main"
    paths = [path for path, _ in handler.requests]
    assert paths[0] == f"/api/models/{REPO}/tree/main?recursive=true"
    assert sorted(paths[1:]) == sorted(f"/{REPO}/resolve/main/{name}" for name in FETCHED)
    assert {auth for _, auth in handler.requests} == {""}  # no HF_TOKEN: no Authorization header
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == FETCHED
    assert (folder / SHARDS[1]).read_bytes() == repo_files()[SHARDS[1]]


def test_a_gated_repo_needs_hf_token_and_the_cache_serves_the_second_call(tmp_path, hub_server, monkeypatch):
    base, handler = hub_server
    settings = load_settings(home=tmp_path / "home", mirror="")
    with pytest.raises(DownloadError) as refused:
        fetch_model_repo("acme/gated", settings)
    message = str(refused.value)
    assert "acme/gated is gated or private" in message and "HF_TOKEN" in message and "\n" not in message
    assert "https://huggingface.co/acme/gated" in message and "secret" not in message
    assert handler.requests[-1] == ("/acme/gated/resolve/main/config.json", "")  # refused at once: no retries

    monkeypatch.setenv("HF_TOKEN", "wrong-token")
    with pytest.raises(DownloadError, match=r"refused config.json of acme/gated \(HTTP 403\)") as refused:
        fetch_model_repo("acme/gated", settings)
    assert "wrong-token" not in str(refused.value)

    monkeypatch.setenv("HF_TOKEN", "secret")
    handler.requests.clear()
    folder = fetch_model_repo("acme/gated", settings)
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == FETCHED
    assert {auth for _, auth in handler.requests} == {"Bearer secret"}  # on every hub request
    assert len(handler.requests) == len(FETCHED)  # the public listing is cached since the first call
    downloaded = len(handler.requests)
    assert fetch_model_repo("acme/gated", settings) == folder
    assert len(handler.requests) == downloaded  # the second call: listing and files from the cache
    assert not list(folder.glob("*.part")) and "secret" not in " ".join(str(p) for p in folder.rglob("*"))


def test_a_private_repo_and_a_missing_one(tmp_path, hub_server, monkeypatch):
    settings = load_settings(home=tmp_path / "home", mirror="")
    with pytest.raises(DownloadError, match=r"^acme/private is gated or private \(or there is no such repository\)"):
        fetch_model_repo("acme/private", settings)
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert (fetch_model_repo("acme/private", settings) / "config.json").is_file()
    with pytest.raises(DownloadError, match=r"^no model acme/missing on the hub"):
        fetch_model_repo("acme/missing", settings)


def test_a_bad_hf_endpoint_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "huggingface.co")
    with pytest.raises(DownloadError, match=r"HF_ENDPOINT='huggingface.co' is not a hub URL"):
        fetch_model_repo(REPO, load_settings(home=tmp_path, mirror=""))
