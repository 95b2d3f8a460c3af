"""Mirror-aware, hash-verified downloads of the pipeline's public inputs.

With a mirror set, `https://HOST/PATH` is read from `<mirror>/HOST/PATH` and no socket is opened.
Without one, files stream to `<home>/downloads/HOST/PATH.part`, are hashed, and are renamed into place
only when the hash matches; a second call finds the verified file and downloads nothing. A file lock makes
two runs fetching the same file at once safe.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from filelock import FileLock

from gptflow.errors import GptflowError
from gptflow.settings import Settings, get_settings
from gptflow.storage import atomic_path, sha256_file

log = logging.getLogger(__name__)


class DownloadError(GptflowError, RuntimeError):
    """A file could not be fetched, or its content is not what the registry says it is."""

    status: int | None = None  # the HTTP status of a refused download (404, 401, ...); None for anything else


@dataclass(frozen=True)
class Member:
    """A file inside an archive, verified by its own hash (the archive's bytes may differ by source)."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    sha256: str | None  # None: the publisher gives no stable hash (the archive is checked by its member)
    size: int | None
    member: Member | None = None


_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_GPT2_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "sms-spam",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            sha256=None,
            size=None,
            member=Member(
                "SMSSpamCollection",
                "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
                477907,
            ),
        ),
        Source(
            "instruction-data",
            f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
            203524,
        ),
        Source(
            "the-verdict",
            f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
            20479,
        ),
        Source(
            "tinyshakespeare",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            1115394,
        ),
        Source(
            "gpt2-encoder",
            f"{_GPT2_BPE}/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            1042301,
        ),
        Source(
            "gpt2-vocab",
            f"{_GPT2_BPE}/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            456318,
        ),
    ]
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise DownloadError(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}") from None


def url_relpath(url: str) -> Path:
    """`https://HOST/PATH` -> `HOST/PATH`, the layout of both the mirror and the download cache."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DownloadError(f"not an http(s) URL: {url!r}")
    return Path(parsed.netloc) / parsed.path.lstrip("/")


def _verify(path: Path, sha256: str | None, size: int | None, what: str) -> None:
    if size is not None and path.stat().st_size != size:
        raise DownloadError(f"{what}: {path} has {path.stat().st_size} bytes, expected {size}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise DownloadError(f"{what}: sha256 mismatch for {path}: expected {sha256}, got {actual}")


def fetch(
    url: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    settings: Settings | None = None,
    headers: dict[str, str] | None = None,
) -> Path:
    """Return a local, verified copy of `url` (from the mirror, the cache, or the network). `headers` go with the
    GET only (credentials, say): they are never logged and never part of the cache path."""
    settings = settings or get_settings()
    rel = url_relpath(url)
    if settings.mirror is not None:
        path = settings.mirror / rel
        if not path.is_file():
            raise DownloadError(
                f"{url} is not in the mirror: expected the file {path} (GPTFLOW_MIRROR={settings.mirror})"
            )
        _verify(path, sha256, size, f"mirror copy of {url}")
        return path

    dest = settings.downloads_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_file():
            try:
                _verify(dest, sha256, size, f"cached copy of {url}")
                return dest
            except DownloadError as exc:
                log.warning("%s; downloading it again", exc)
                dest.unlink()
        _download(url, dest, sha256=sha256, size=size, settings=settings, headers=headers)
    return dest


def _download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    size: int | None,
    settings: Settings,
    headers: dict[str, str] | None = None,
) -> None:
    """Stream `url` to `dest.part` with retries and backoff; rename to `dest` only once verified."""
    part = dest.with_name(dest.name + ".part")
    attempts = settings.download_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            with httpx.stream(
                "GET", url, headers=headers, timeout=settings.download_timeout_s, follow_redirects=True
            ) as resp:
                resp.raise_for_status()
                with open(part, "wb") as handle:
                    for chunk in resp.iter_bytes(1 << 20):
                        handle.write(chunk)
            break
        except (httpx.HTTPError, OSError) as exc:
            part.unlink(missing_ok=True)
            status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
            permanent = status is not None and 400 <= status < 500 and status not in (408, 429)
            if permanent or attempt == attempts:
                error = DownloadError(
                    f"could not download {url} after {attempt} attempt(s): {exc}. "
                    "Behind a firewall? Set GPTFLOW_MIRROR to a folder laid out as HOST/PATH."
                )
                error.status = status
                raise error from None
            delay = min(2 ** (attempt - 1), 30)
            log.warning("download of %s failed (%s); retry %d/%d in %ss", url, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    try:
        _verify(part, sha256, size, f"download of {url}")
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)


def fetch_source(name: str, settings: Settings | None = None) -> Path:
    """Fetch a registered source; for an archive, return its verified, extracted member."""
    source = get_source(name)
    settings = settings or get_settings()
    archive = fetch(source.url, sha256=source.sha256, size=source.size, settings=settings)
    if source.member is None:
        return archive
    return extract_member(archive, source.member, settings.downloads_dir / "extracted" / source.name)


def extract_member(archive: Path, member: Member, out_dir: Path) -> Path:
    out = out_dir / member.name
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file() and out.stat().st_size == member.size and sha256_file(out) == member.sha256:
            return out
        try:
            with zipfile.ZipFile(archive) as zf, atomic_path(out) as tmp:
                try:
                    data = zf.read(member.name)
                except KeyError:
                    raise DownloadError(f"{archive} has no member {member.name!r}; it holds {zf.namelist()}") from None
                tmp.write_bytes(data)
                _verify(tmp, member.sha256, member.size, f"{member.name} extracted from {archive}")
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{archive} is not a valid zip archive: {exc}") from None
    return out
