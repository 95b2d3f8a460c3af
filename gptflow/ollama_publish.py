"""Put a GGUF bundle into an Ollama server (`gptflow publish NAME BUNDLE`), through Ollama's REST API
(https://github.com/ollama/ollama/blob/main/docs/api.md).

A GGUF bundle (`gptflow export MODEL --format gguf`) holds the GGUF, its Modelfile (`gptflow.modelfile`) and
manifest.json (format `gptflow-edge-bundle/1`, kind "gguf", the sha256 of every other file, the GGUF's name). The
bundle is checked before any request: the manifest's kind, the Modelfile's `FROM` naming the manifest's GGUF, and
the sha256 of the Modelfile and of the GGUF against the manifest. Then:

1. `HEAD /api/blobs/sha256:<hex>` asks whether the server already holds the GGUF (200: yes, 404: no); the `ollama`
   client (0.6) has no call for it, so it is asked with httpx at the same address, with the same timeout;
2. only when it does not, `POST /api/blobs/sha256:<hex>` uploads it (`ollama.Client.create_blob`): publishing the
   same file twice uploads nothing;
3. `POST /api/create` names the model: `files` {GGUF name: digest}, the Modelfile's template, system prompt and
   parameters (its numbers and `stop` list).

Every failure is one line: a bad bundle names the file and field and what was expected, an unreachable server or a
refused request names the host (and the HTTP status).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import ollama

from edge import BundleError
from edge.runtime import BUNDLE_MANIFEST, GGUF_FILE, read_manifest, verify_bundle
from edge.runtime import GGUF as GGUF_KIND
from gptflow.errors import GptflowError
from gptflow.modelfile import MODELFILE, Modelfile
from gptflow.settings import Settings, get_settings, ollama_model_name, ollama_url

DEFAULT_TIMEOUT_S = 600.0  # per request phase (connect, each read or write): a create of a large GGUF takes a while
CONNECT_TIMEOUT_S = 10.0
MAKE_ONE = "make one with `gptflow export MODEL --format gguf`"


class PublishError(GptflowError):
    """A model cannot be published: a bad name or host, or the Ollama server failed or refused a request."""


class GgufBundleError(PublishError, ValueError):
    """The folder is not a GGUF bundle, or a file of it is missing or changed since export."""


@dataclass(frozen=True)
class GgufBundle:
    """A checked GGUF bundle: its folder, manifest, GGUF file (name, sha256 hex, size) and parsed Modelfile."""

    folder: Path
    manifest: dict[str, Any]
    gguf: Path
    sha256: str
    size: int
    modelfile: Modelfile

    @property
    def digest(self) -> str:
        """The GGUF's blob digest as Ollama names it."""
        return f"sha256:{self.sha256}"


def read_bundle(bundle: str | Path, verify: bool = True) -> GgufBundle:
    """The GGUF bundle in `bundle`, checked as every bundle is (`edge.runtime.read_manifest`: format, kind "gguf", the
    GGUF and the Modelfile listed and present; with `verify`, every file's sha256), and the Modelfile's FROM naming
    the manifest's GGUF. Raises GgufBundleError (or the Modelfile's ModelfileError) naming the file and field."""
    folder = Path(bundle)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise GgufBundleError(f"{folder} {what}; expected a GGUF bundle folder ({MAKE_ONE})")
    try:
        manifest = verify_bundle(folder, GGUF_KIND) if verify else read_manifest(folder, GGUF_KIND)
    except BundleError as exc:
        raise GgufBundleError(str(exc)) from None
    name = manifest.get("gguf", GGUF_FILE)
    if name not in manifest["files"]:
        raise GgufBundleError(f"{folder / BUNDLE_MANIFEST}: 'gguf' names {name!r}, which 'files' does not list")
    modelfile = Modelfile.read(folder / MODELFILE)
    if modelfile.source != name:
        raise GgufBundleError(
            f"{folder / MODELFILE}: FROM names ./{modelfile.source}, but {BUNDLE_MANIFEST}'s 'gguf' is {name}; "
            "expected the same file"
        )
    gguf = folder / name
    return GgufBundle(folder, manifest, gguf, manifest["files"][name], gguf.stat().st_size, modelfile)


def check_model_name(name: str) -> str:
    """`name` if Ollama accepts it as a model name (`gptflow.settings.ollama_model_name`), else PublishError."""
    try:
        return ollama_model_name(name)
    except ValueError as exc:
        raise PublishError(f"model name: {exc}") from None


def resolve_host(host: str | None = None, settings: Settings | None = None) -> str:
    """`host`, else the settings' Ollama host (OLLAMA_HOST), as a URL; PublishError naming what is wrong."""
    value = host if host is not None else (settings or get_settings()).ollama_host
    try:
        return ollama_url(value)
    except ValueError as exc:
        raise PublishError(f"Ollama host: {exc}") from None


def publish_bundle(
    name: str,
    bundle: str | Path,
    host: str | None = None,
    settings: Settings | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Create model `name` on the Ollama server at `host` (default: the settings' OLLAMA_HOST) from the GGUF bundle
    `bundle`, uploading the GGUF only when the server lacks its blob. Returns a report: name, host, bundle, gguf,
    digest, uploaded, bytes (the GGUF's size), bytes_uploaded, the template, system, stops and parameters sent, the
    create status, and the manifest's family and quant. Everything is checked before the first request."""
    name = check_model_name(name)
    url = resolve_host(host, settings)
    checked = read_bundle(bundle)
    modelfile = checked.modelfile
    parameters = modelfile.create_parameters()
    timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
    blob = f"/api/blobs/{checked.digest}"
    with httpx.Client(base_url=url, timeout=timeout) as http, ollama.Client(host=url, timeout=timeout) as client:
        with _requests_to(url, f"HEAD {blob}", timeout_s):
            uploaded = not _blob_exists(http, blob, url)
        if uploaded:
            with _requests_to(url, f"the upload of {checked.gguf.name} (POST {blob})", timeout_s):
                sent = client.create_blob(checked.gguf)
            if sent != checked.digest:
                raise GgufBundleError(
                    f"{checked.gguf} changed while it was uploaded (sha256 {sent.removeprefix('sha256:')[:12]}..., "
                    f"manifest {checked.sha256[:12]}...); export the bundle again"
                )
        with _requests_to(url, "POST /api/create", timeout_s):
            response = client.create(
                model=name,
                files={checked.gguf.name: checked.digest},
                template=modelfile.template,
                system=modelfile.system,
                parameters=parameters,
                stream=False,
            )
    if response.status != "success":
        raise PublishError(f"Ollama at {url} answered POST /api/create with status {response.status!r}, not 'success'")
    return {
        "name": name,
        "host": url,
        "bundle": str(checked.folder),
        "gguf": checked.gguf.name,
        "digest": checked.digest,
        "uploaded": uploaded,
        "bytes": checked.size,
        "bytes_uploaded": checked.size if uploaded else 0,
        "template": modelfile.template,
        "system": modelfile.system,
        "stops": list(modelfile.stops),
        "parameters": parameters,
        "status": response.status,
        "family": checked.manifest.get("family"),
        "quant": checked.manifest.get("quant"),
    }


def _blob_exists(http: httpx.Client, path: str, url: str) -> bool:
    """Whether the server holds the blob: HEAD answers 200 (yes) or 404 (no); anything else is an error."""
    response = http.head(path)
    if response.status_code in (200, 404):
        return response.status_code == 200
    raise PublishError(
        f"Ollama at {url} answered HEAD {path} with HTTP {response.status_code} {response.reason_phrase}"
    )


@contextlib.contextmanager
def _requests_to(url: str, what: str, timeout_s: float) -> Iterator[None]:
    """Failures of the requests in the block as one-line PublishErrors naming the host and the request."""
    try:
        yield
    except (ConnectionError, httpx.ConnectError) as exc:  # the ollama client turns httpx's ConnectError into this
        reason = _one_line(exc) if isinstance(exc, httpx.ConnectError) else "cannot connect"
        raise PublishError(
            f"Ollama is not reachable at {url} ({what}: {reason}); start it with `ollama serve`, or point "
            "OLLAMA_HOST at it"
        ) from None
    except httpx.TimeoutException:
        raise PublishError(f"Ollama at {url} did not answer {what} within {timeout_s:g} s") from None
    except httpx.TransportError as exc:
        raise PublishError(
            f"the connection to Ollama at {url} broke during {what} ({type(exc).__name__}: {_one_line(exc)})"
        ) from None
    except ollama.ResponseError as exc:
        raise PublishError(f"Ollama at {url} refused {what}: HTTP {exc.status_code}: {_one_line(exc.error)}") from None


def _one_line(error: Any) -> str:
    return " ".join(str(error).split()) or type(error).__name__
