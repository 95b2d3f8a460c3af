"""Fresh data: a user's own input files, checked on every run, each content seen becoming a data version.

A source is a local file or an http(s) URL. A file is hashed; a URL is asked with a conditional GET (the last
reply's ETag and Last-Modified): 304 means unchanged without a download, 200 is downloaded and hashed, so a
server that sends no validators still gets no new version for the same bytes. With a mirror set, a URL is read
from `<mirror>/HOST/PATH` as every other download is. Downloaded content lands in a content-addressed folder
(`<home>/sources/<slug>/<sha12>/<file name>`), so the data stage reads a path that never changes under it.

Each source's history is `<home>/sources/<slug>/versions.json`: every content hash with the run and time that
first saw it, and which hash the last check found. The data stages downstream are keyed on content already:
unchanged content reuses them, new content builds a new data version and everything downstream of it.
Registered public inputs (`gptflow.download.SOURCES`) are pinned by sha256 and never "change".
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx
from filelock import FileLock

from gptflow.download import SOURCES, url_relpath
from gptflow.errors import GptflowError
from gptflow.settings import Settings, get_settings
from gptflow.storage import read_json, sha256_bytes, sha256_file, write_json_atomic

Status = Literal["pinned", "new", "changed", "unchanged"]


class SourceError(GptflowError, ValueError):
    """A source names no readable file, or its server refuses it for good."""


class TransientSourceError(GptflowError, RuntimeError):
    """The server could not be reached or failed (timeout, 5xx, 408/429): worth retrying later."""


@dataclass(frozen=True)
class SourceCheck:
    """What one run found for one source."""

    role: str  # which input of the pipeline: classifier, instructions, corpus
    ref: str  # as the user named it: a registered name, a path or a URL
    path: str  # the local file the data stage reads
    sha256: str | None  # None for a pinned source (its own registry holds the hash)
    status: Status
    how: str  # how the check decided: pinned, hash, ETag, Last-Modified, download
    since_run: str | None  # the run that first saw this content
    since: str | None  # and when
    previous_sha256: str | None = None

    @property
    def note(self) -> str:
        if self.status == "pinned":
            return "pinned by sha256"
        if self.status == "unchanged":
            return f"data unchanged since run {self.since_run} ({self.since})"
        if self.status == "new":
            return f"first version {self.sha256[:12]}"
        return f"new data version {self.sha256[:12]} (was {self.previous_sha256[:12]})"

    def to_dict(self) -> dict:
        return {**asdict(self), "note": self.note}


def is_url(ref: str) -> bool:
    return urlsplit(ref).scheme in ("http", "https")


def source_dir(ref: str, settings: Settings) -> Path:
    """`<home>/sources/<file stem>-<sha8 of the reference>`: one history per path or URL."""
    stem = Path(urlsplit(ref).path if is_url(ref) else ref).stem or "source"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem)[:40]
    return settings.home / "sources" / f"{stem}-{sha256_bytes(ref.encode())[:8]}"


def check_source(role: str, ref: str, run: str, settings: Settings | None = None) -> SourceCheck:
    """Check `ref` for new content and record what this run saw."""
    settings = settings or get_settings()
    if ref in SOURCES:
        return SourceCheck(role, ref, ref, None, "pinned", "pinned", None, None)
    folder = source_dir(ref, settings)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / "versions.json.lock")):
        history = _read_history(folder, ref)
        last = history["versions"].get(history["current"]) if history["current"] else None
        if is_url(ref) and settings.mirror is None:
            path, digest, how, validators = _fetch_url(ref, folder, last, settings)
        else:
            path = settings.mirror / url_relpath(ref) if is_url(ref) else Path(ref)
            if not path.is_file():
                where = f" (the mirror copy of {ref})" if is_url(ref) else ""
                raise SourceError(f"data source {path}{where} does not exist or is not a file")
            digest, how, validators = sha256_file(path), "hash", {}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        seen = history["versions"].setdefault(
            digest, {"first_run": run, "first_seen": now, "path": str(path), "runs": 0}
        )
        seen.update(validators, path=str(path), runs=seen["runs"] + 1, last_run=run, last_seen=now)
        previous = history["current"]
        status: Status = "new" if previous is None else "unchanged" if previous == digest else "changed"
        history.update(current=digest, last_run=run)
        write_json_atomic(folder / "versions.json", history)
    return SourceCheck(
        role,
        ref,
        str(path),
        digest,
        status,
        how,
        seen["first_run"],
        seen["first_seen"],
        previous if status == "changed" else None,
    )


def _read_history(folder: Path, ref: str) -> dict:
    path = folder / "versions.json"
    if not path.is_file():
        return {"ref": ref, "current": None, "versions": {}}
    history = read_json(path)
    if not isinstance(history, dict) or history.get("ref") != ref or not isinstance(history.get("versions"), dict):
        raise SourceError(f"{path} is not the version history of {ref}; move it aside to start a new history")
    return history


def _fetch_url(ref: str, folder: Path, last: dict | None, settings: Settings) -> tuple[Path, str, str, dict]:
    """(local file, sha256, how decided, validators to keep) for a URL, downloading only when it changed."""
    headers = {}
    cached = Path(last["path"]) if last else None
    if cached is not None and cached.is_file():
        if last.get("etag"):
            headers["If-None-Match"] = last["etag"]
        if last.get("last_modified"):
            headers["If-Modified-Since"] = last["last_modified"]
    name = Path(urlsplit(ref).path).name or "download"
    try:
        with httpx.stream("GET", ref, headers=headers, timeout=settings.download_timeout_s, follow_redirects=True) as r:
            if r.status_code == 304 and headers:
                how = "ETag" if "If-None-Match" in headers else "Last-Modified"
                return cached, sha256_file(cached), how, {}
            if r.status_code >= 500 or r.status_code in (408, 429):
                raise TransientSourceError(f"{ref}: HTTP {r.status_code} from the server")
            if r.status_code != 200:
                raise SourceError(f"{ref}: HTTP {r.status_code}; expected 200 (or 304 when unchanged)")
            validators = {"etag": r.headers.get("ETag"), "last_modified": r.headers.get("Last-Modified")}
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".download", dir=folder)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as handle:
                    for chunk in r.iter_bytes(1 << 20):
                        handle.write(chunk)
                digest = sha256_file(tmp)
                final = folder / digest[:12] / name
                final.parent.mkdir(exist_ok=True)
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)  # same bytes when it exists already: replacing is harmless
            finally:
                tmp.unlink(missing_ok=True)
    except httpx.HTTPError as exc:
        raise TransientSourceError(f"{ref}: {type(exc).__name__}: {exc}") from None
    return final, digest, "download", validators
