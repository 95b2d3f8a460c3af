"""Shared fixtures: an isolated outputs root, the offline mirror, the tokenizer and a Prefect test harness."""

from __future__ import annotations

import inspect
import os
import re
import socket
from pathlib import Path
from typing import Any

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


# The unit tier (`make check`) leaves out tests marked `slow`, `server` or `subprocess`. The last two are set here
# from what a test uses, so that a new test cannot slip a server or a child process into the fast tier unmarked:
# `server` for a test that uses the session's Prefect server (`prefect_harness`), `subprocess` for one whose body
# or fixtures start a process.
STARTS_A_PROCESS = re.compile(r"\bsubprocess\.(run|Popen|call|check_call|check_output)\(|\bLocalCluster\(|\blaunch\(")


def _starts_a_process(function: Any) -> bool:
    try:
        return bool(STARTS_A_PROCESS.search(inspect.getsource(function)))
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "prefect_harness" in names:
            item.add_marker(pytest.mark.server)
        definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        functions = [getattr(item, "function", None)] + [d.func for defs in definitions.values() for d in defs]
        if any(_starts_a_process(f) for f in functions if f is not None):
            item.add_marker(pytest.mark.subprocess)


# One factory for the tiny configs the tests train with: the `tiny` preset, plus each test's own fields.
def tiny_config(kind: str, **fields: Any):
    """`kind`'s config (pretrain | classifier | instruct | gpt) for the `tiny` preset with `fields` on top."""
    if kind == "gpt":
        from model.config import GPTConfig

        return GPTConfig.from_preset("tiny", **fields)
    from model.configs import ClassifierConfig, InstructConfig, PretrainConfig

    classes = {"pretrain": PretrainConfig, "classifier": ClassifierConfig, "instruct": InstructConfig}
    if kind not in classes:
        raise ValueError(f"tiny_config: unknown kind {kind!r}")
    config_class = classes[kind]
    return config_class(**{"preset": "tiny", **fields})


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


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python (llama.cpp itself, built by `make llama-cpp`); its tests skip without it, unless
    GPTFLOW_REQUIRE_LLAMA_CPP is set (`.ci/run`), where its absence fails them."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("GPTFLOW_REQUIRE_LLAMA_CPP"):
            pytest.fail("llama-cpp-python is not installed (GPTFLOW_REQUIRE_LLAMA_CPP is set): run `make llama-cpp`")
        pytest.skip("llama-cpp-python is not installed: `make llama-cpp` builds it")
    return llama_cpp


@pytest.fixture
def fake_ollama():
    """A loopback Ollama API with scripted replies and fault modes (tests/fake_ollama.py)."""
    from fake_ollama import FakeOllama

    with FakeOllama() as server:
        yield server


@pytest.fixture(scope="session")
def topic_classifier(tmp_path_factory, tokenizer, mirror) -> dict[str, Any]:
    """A tiny 3-topic classifier that learned (60 training texts, 3 epochs), exported with int8 and checked on 102 test
    texts: trained once per session for the tests that read a real bundle (export, edge runtime, champion)."""
    from classify_data import write_splits

    from gptflow.tokenizer import tokenizer_files
    from model.configs import ExportConfig
    from model.finetune_classifier import finetune
    from model.onnx_export import export_classifier

    root = tmp_path_factory.mktemp("topic-classifier")
    data = write_splits(root / "data", (20, 5, 34))  # 60 train, 15 validation, 102 test texts
    config = tiny_config("classifier", trainable="all", lr=2e-3, epochs=3, batch_size=8, patience=None)
    tuned = finetune(data, root / "clf", config, tokenizer=tokenizer)
    report = export_classifier(
        tuned.best,
        data,
        root / "export",
        ExportConfig(),
        tokenizer=tokenizer,
        tokenizer_files=tokenizer_files(load_settings(mirror=mirror)),
    )
    return {"root": root, "data": data, "best": tuned.best, "report": report, "bundle": Path(report["bundle"])}


def standalone_edge_script(*blocked: str) -> str:
    """A script for `python -I -S SCRIPT EDGE_PARENT SITE_PACKAGES ARGS...`: `python -m edge ARGS` from a copy of
    edge/, with torch, every package of ours and `blocked` unimportable (no site processing: sys.path is the stdlib
    plus the copy's parent and the venv's site-packages, without the .pth that makes this repository importable)."""
    names = {"torch", "pydantic", "prefect", "gptflow", "model", "eval", "data", "tasks", "flows", "cli", *blocked}
    return f"""
import runpy, sys
BLOCKED = {sorted(names)!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path += sys.argv[1:3]
import edge
assert edge.__file__.startswith(sys.argv[1]), edge.__file__
sys.argv = ["edge", *sys.argv[3:]]
runpy.run_module("edge", run_name="__main__")
"""
