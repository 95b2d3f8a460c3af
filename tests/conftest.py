"""Shared fixtures: an isolated outputs root, the offline mirror, the tokenizer and a Prefect test harness."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from gptflow.settings import Settings, get_settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def mirror_root() -> Path:
    """The offline mirror: GPTFLOW_MIRROR, else ../shared/mirror beside the checkout."""
    configured = os.environ.get("GPTFLOW_MIRROR")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "mirror"
    if not path.is_dir():
        pytest.fail(f"the tests read public inputs from the offline mirror; {path} does not exist (set GPTFLOW_MIRROR)")
    return path.resolve()


def write_random_tokens(folder: Path, n_train: int, n_val: int, seed: int) -> Path:
    """Random GPT-2 token ids in `folder` as the corpus stage writes them (uint16 train.bin and val.bin)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rng.integers(0, 50257, n_train).astype(np.uint16).tofile(folder / "train.bin")
    rng.integers(0, 50257, n_val).astype(np.uint16).tofile(folder / "val.bin")
    return folder


def command_env(tmp_path: Path, mirror: Path, api: str | None = None) -> dict[str, str]:
    """The environment of a `gptflow` command run as a subprocess: outputs and Prefect state under `tmp_path`, the
    mirror, a generous Prefect start-up timeout, and no Prefect API of the outside world."""
    env = {
        **os.environ,
        "GPTFLOW_HOME": str(tmp_path / "home"),
        "GPTFLOW_MIRROR": str(mirror),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_URL", None)
    if api is not None:  # the session's test server: no temporary server to start (about 25 s a command)
        env["PREFECT_API_URL"] = api
    return env


@pytest.fixture(scope="session", autouse=True)
def prefect_logging_on_session_streams():
    """Configure Prefect's logging once, on the session's streams. Otherwise the first test that happens to
    trigger it (a CLI test under capsys) binds Prefect's console handler to a stream closed after that test,
    and later flows fail on their first log line."""
    from prefect.logging.configuration import setup_logging

    setup_logging()


@pytest.fixture(scope="session")
def mirror() -> Path:
    return mirror_root()


@pytest.fixture
def settings(tmp_path, mirror, monkeypatch) -> Settings:
    """Settings with a fresh outputs root under tmp_path and the mirror on; also set in the environment."""
    home = tmp_path / "outputs"
    monkeypatch.setenv("GPTFLOW_HOME", str(home))
    monkeypatch.setenv("GPTFLOW_MIRROR", str(mirror))
    get_settings.cache_clear()
    yield load_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tokenizer(mirror):
    from gptflow.tokenizer import get_tokenizer

    return get_tokenizer(load_settings(mirror=mirror))


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection (loopback included)."""

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network connection attempted to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a[0] if a else None))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One ephemeral Prefect API for the whole session (its cold start is slow: generous timeout)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def fake_ollama():
    """A loopback Ollama API with scripted replies and fault modes (tests/fake_ollama.py)."""
    from fake_ollama import FakeOllama

    with FakeOllama() as server:
        yield server
