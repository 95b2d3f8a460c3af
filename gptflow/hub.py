"""A Hugging Face model repository by name (`gpt2`, `distilgpt2`, `owner/name`), fetched file by file through
`gptflow.download`, so that it obeys the same rules as every other public input.

- Mirror rule: with GPTFLOW_MIRROR set, `https://huggingface.co/PATH` is read from `<mirror>/huggingface.co/PATH`
  and nothing touches the network: the listing from `huggingface.co/api/models/<repo>/tree/main` (the query is not
  part of the path), the files from `huggingface.co/<repo>/resolve/main/<file>`. Without a mirror, the same layout
  is the download cache under `<home>/downloads/`; a second call finds the verified files and downloads nothing
  (the listing included: `main` is read once; delete the cached listing to read it again).
- Hashes come from the hub's own listing: the sha256 of every LFS file (the weights), the size of every file.
- HF_ENDPOINT (as Hugging Face's own tools read it) points the downloads at another hub, a company proxy say;
  the cache then sits under that host's name. The mirror layout stays `huggingface.co/...` whatever HF_ENDPOINT is:
  a mirror is a copy of the canonical URLs.
- HF_TOKEN, when set, goes with every hub request as `Authorization: Bearer <token>` (gated and private repos);
  it is never logged, never part of a path and never in a message.
- No `huggingface_hub` dependency: our download layer already does the mirror, the cache, retries, hashes and
  locks, and a model folder needs only a handful of files.

Only the repository's top-level files are fetched (the listing is not paginated past its first page, which holds
every top-level file of an ordinary model repository), and only safetensors weights are read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from gptflow.download import DownloadError, fetch
from gptflow.settings import Settings, get_settings

log = logging.getLogger(__name__)

HUB = "https://huggingface.co"
ENDPOINT_VARIABLE = "HF_ENDPOINT"
TOKEN_VARIABLE = "HF_TOKEN"

ALIASES: dict[str, str] = {
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Fetched when the listing has them: the tokenizer (fast tokenizer, or GPT-2's vocab.json + merges.txt), its
# chat template and special tokens, and the generation defaults.
OPTIONAL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)
_OTHER_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

# A hub name part, as the hub itself allows it: letters, digits and . _ -, starting and ending with a letter or digit.
_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def repo_id(name: str) -> str | None:
    """The hub repository `name` means (`gpt2` -> `openai-community/gpt2`; `owner/name` as it is), or None when
    `name` is not a hub name. A pure string function: a caller that also accepts local folders checks for an
    existing path first."""
    if name in ALIASES:
        return ALIASES[name]
    parts = name.split("/")
    if len(parts) != 2 or not all(_PART.fullmatch(part) for part in parts):
        return None
    owner, repo = parts
    if ".." in name or "--" in name or len(owner) > 96 or len(repo) > 96 or repo.endswith(".git"):
        return None
    return name


def hub_endpoint(settings: Settings | None = None) -> str:
    """The hub the files come from: https://huggingface.co, or HF_ENDPOINT when set and no mirror is (a mirror is
    laid out by the canonical URLs)."""
    settings = settings or get_settings()
    value = os.environ.get(ENDPOINT_VARIABLE, "").strip()
    if settings.mirror is not None or not value:
        return HUB
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.fragment:
        raise DownloadError(f"{ENDPOINT_VARIABLE}={value!r} is not a hub URL (expected http(s)://HOST[/PATH])")
    return value.rstrip("/")


def fetch_model_repo(repo: str, settings: Settings | None = None) -> Path:
    """Fetch the model files of hub repository `repo` (an alias such as `gpt2`, or `owner/name`) at `main` and return
    their folder, `.../huggingface.co/<repo>/resolve/main/`: a Hugging Face model folder (config.json, the
    safetensors weights, sharded or not, and the tokenizer and generation files the repository has)."""
    settings = settings or get_settings()
    name = repo_id(repo)
    if name is None:
        raise DownloadError(
            f"{repo!r} is not a Hugging Face model name (expected owner/name of letters, digits and . _ -, "
            f"or one of {', '.join(sorted(ALIASES))})"
        )
    base = hub_endpoint(settings)
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    listing = _listing(name, base, settings, headers, token_set=bool(token))
    if CONFIG_FILE not in listing:
        raise DownloadError(f"{name} has no {CONFIG_FILE} on main: not a transformers model repository")

    def get(file: str) -> Path:
        return _fetch_file(name, base, file, listing, settings, headers, token_set=bool(token))

    paths = [get(CONFIG_FILE)]  # first: a gated repository is refused before any large download
    paths += _weights(name, listing, get)
    paths += [get(file) for file in OPTIONAL_FILES if file in listing]
    folder = paths[0].parent
    assert all(path.parent == folder for path in paths), paths  # plain file names: one URL folder
    log.info("model %s: %d files in %s", name, len(paths), folder)
    return folder


def _listing(
    repo: str, base: str, settings: Settings, headers: dict[str, str] | None, *, token_set: bool
) -> dict[str, dict[str, Any]]:
    """The repository's files at `main`, by path, as the hub lists them (type, path, size, oid, lfs)."""
    url = f"{base}/api/models/{repo}/tree/main?recursive=true"
    try:
        path = fetch(url, settings=settings, headers=headers)
    except DownloadError as exc:
        if exc.status == 404:
            raise DownloadError(f"no model {repo} on the hub ({base} answered 404 for its file listing)") from None
        if exc.status in (401, 403):
            raise _refused(repo, exc.status, None, token_set) from None
        raise
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DownloadError(f"the hub's file listing of {repo} ({path}) is not JSON: {exc}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DownloadError(f"the hub's file listing of {repo} ({path}) is not a JSON list of files")
    return {e["path"]: e for e in entries if e.get("type") == "file" and isinstance(e.get("path"), str)}


def _weights(repo: str, listing: dict[str, dict[str, Any]], get: Callable[[str], Path]) -> list[Path]:
    """model.safetensors when the repository has it (transformers prefers it too), else the index and its shards."""
    if WEIGHTS_FILE in listing:
        return [get(WEIGHTS_FILE)]
    if WEIGHTS_INDEX_FILE not in listing:
        others = [f for f in _OTHER_WEIGHTS if f in listing]
        held = f" (it has {', '.join(others)})" if others else ""
        raise DownloadError(
            f"{repo} has no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}) on main{held}; "
            "gptflow reads only safetensors"
        )
    index_path = get(WEIGHTS_INDEX_FILE)
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DownloadError(
            f"{index_path} is not a safetensors index (a JSON object with a weight_map): {exc!r}"
        ) from None
    if not shards:
        raise DownloadError(f"{index_path} names no shard in its weight_map")
    for shard in shards:
        if not isinstance(shard, str) or not _FILE_NAME.fullmatch(shard) or not shard.endswith(".safetensors"):
            raise DownloadError(f"{index_path} names the shard {shard!r}: expected a plain *.safetensors file name")
        if shard not in listing:
            raise DownloadError(f"{index_path} names the shard {shard}, which the hub's listing of {repo} has not")
    return [index_path, *(get(shard) for shard in shards)]


def _fetch_file(
    repo: str,
    base: str,
    file: str,
    listing: dict[str, dict[str, Any]],
    settings: Settings,
    headers: dict[str, str] | None,
    *,
    token_set: bool,
) -> Path:
    """One file of the repository, checked by the listing's sha256 (LFS files) and size."""
    entry = listing.get(file, {})
    lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
    sha256 = lfs.get("oid")  # git's own oid of a small file is a sha1 of "blob <size>\0<bytes>": not used
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.fullmatch(sha256)):
        raise DownloadError(f"the hub's listing of {repo} gives {file} the sha256 {sha256!r}: not 64 hex digits")
    size = entry.get("size", lfs.get("size"))
    size = size if isinstance(size, int) and not isinstance(size, bool) else None
    try:
        return fetch(f"{base}/{repo}/resolve/main/{file}", sha256=sha256, size=size, settings=settings, headers=headers)
    except DownloadError as exc:
        if exc.status in (401, 403):
            raise _refused(repo, exc.status, file, token_set) from None
        raise


def _refused(repo: str, status: int, file: str | None, token_set: bool) -> DownloadError:
    """The one-line error of a 401/403 for `file` (None: the listing): a gated or private repository. The hub
    lists a gated repository's files to anyone and refuses the files; it answers 401 for the listing of a private
    repository, and of one that does not exist, to anyone without access. The token itself is never in it."""
    page = f"{HUB}/{repo}"
    what = "its file listing" if file is None else file
    maybe = " (or there is no such repository)" if file is None else ""
    if token_set:
        return DownloadError(
            f"the hub refused {what} of {repo} (HTTP {status}) with the token in {TOKEN_VARIABLE}: the repository is "
            f"gated or private{maybe} and the token is invalid, or its account has not accepted its licence at {page}"
        )
    return DownloadError(
        f"{repo} is gated or private{maybe} (HTTP {status} for {what}): set {TOKEN_VARIABLE} to a token whose "
        f"account has accepted its licence at {page}"
    )
