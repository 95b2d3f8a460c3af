"""Atomic writes, hashing and the stage lock: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from edge import sha256_file  # noqa: F401 (re-exported: the one file hash)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it over `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; if the block succeeds it replaces `final` (an existing
    folder is moved aside first, so the swap is two renames), else it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders
        old = final.with_name(f"{tmp.name}.old") if final.exists() else None
        if old is not None:
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        self.key, self.line = key, line


@functools.cache
def _unique_key_loader():
    """YAML's safe loader, except that a key given twice in one mapping is refused (safe_load keeps the last one
    silently, so `lr` written twice in a recipe would hide the first)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding a mapping (a config file); every problem is one GptflowError naming the file."""
    import yaml

    from gptflow.errors import GptflowError

    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except _DuplicateKey as exc:
        raise GptflowError(f"{path}: line {exc.line}: {exc.key!r} is given twice; keep one") from None
    except OSError as exc:
        raise GptflowError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise GptflowError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); expected a YAML "
            "or JSON file"
        ) from None
    except yaml.YAMLError as exc:
        raise GptflowError(f"{path} is not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise GptflowError(f"{path} holds a {type(data).__name__}, not a mapping of config fields")
    return data


def code_version() -> str:
    """The git commit of the checkout (with a -dirty suffix), or the package version outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from gptflow import __version__

        return __version__


@contextlib.contextmanager
def stage_lock(stage_dir: str | Path) -> Iterator[None]:
    """Hold `<stage_dir>.lock` while a stage writes its folder: a second run that needs the same stage (same
    inputs and config, hence the same folder) waits, then finds it complete and reuses it."""
    stage_dir = Path(stage_dir)
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(stage_dir) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another run is writing %s; waiting for it", stage_dir)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
