"""`gptflow publish NAME BUNDLE`: a GGUF bundle into Ollama, run with the real `ollama` client against the loopback
fake server (tests/fake_ollama.py). The bundle is a few KB of bytes standing for a GGUF: nothing here parses it."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import httpx
import ollama
import pytest
from fake_ollama import closed_port_host

from cli import main
from edge.runtime import BUNDLE_FORMAT
from gptflow.modelfile import Modelfile, ModelfileError, frame_template
from gptflow.ollama_publish import GgufBundleError, PublishError, publish_bundle, read_bundle
from gptflow.storage import sha256_file

NAME = "gpt2-tiny"
STOPS = ("<|endoftext|>", "### Instruction:")
PARAMETERS = {"num_ctx": 1024, "temperature": 0.7, "top_k": 40}
TEMPLATE = frame_template(
    "Below is an instruction that describes a task.\n\n### Instruction:\n", "\n\n### Response:\n", "<|endoftext|>"
)
SYSTEM = "You answer briefly."


def write_manifest(folder: Path, **changes) -> dict:
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
    manifest = {
        "format": BUNDLE_FORMAT,
        "kind": "gguf",
        "files": files,
        "gguf": "model.gguf",
        "quant": "q8_0",
        "family": "gpt2",
        **changes,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A GGUF bundle as `gptflow export MODEL --format gguf` writes it, with 6 KB of stand-in GGUF bytes."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 24)
    modelfile = Modelfile("model.gguf", TEMPLATE, STOPS, PARAMETERS, SYSTEM)
    (folder / "Modelfile").write_text(modelfile.text(), encoding="utf-8")
    write_manifest(folder)
    return folder


def digest_of(bundle: Path) -> str:
    return "sha256:" + hashlib.sha256((bundle / "model.gguf").read_bytes()).hexdigest()


def calls(fake) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in fake.requests]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- publishing ------------------------------------------------------------------------------------------------
def test_publish_uploads_the_gguf_then_creates_the_model(fake_ollama, bundle):
    digest = digest_of(bundle)
    size = (bundle / "model.gguf").stat().st_size
    assert digest == "sha256:" + json.loads((bundle / "manifest.json").read_text())["files"]["model.gguf"]

    report = publish_bundle(NAME, bundle, host=fake_ollama.host, timeout_s=5)

    blob = f"/api/blobs/{digest}"
    assert calls(fake_ollama) == [("HEAD", blob), ("POST", blob), ("POST", "/api/create")]
    assert fake_ollama.requests[1].body == {"bytes": size}  # the byte count, not the bytes
    assert fake_ollama.blobs == {digest: size}
    parameters = {**PARAMETERS, "stop": list(STOPS)}
    assert fake_ollama.requests[2].body == {
        "model": NAME,
        "stream": False,
        "files": {"model.gguf": digest},
        "template": TEMPLATE,
        "system": SYSTEM,
        "parameters": parameters,
    }
    assert report == {
        "name": NAME,
        "host": fake_ollama.host,
        "bundle": str(bundle),
        "gguf": "model.gguf",
        "digest": digest,
        "uploaded": True,
        "bytes": size,
        "bytes_uploaded": size,
        "template": TEMPLATE,
        "system": SYSTEM,
        "stops": list(STOPS),
        "parameters": parameters,
        "status": "success",
        "family": "gpt2",
        "quant": "q8_0",
    }
    # The model is now the server's: listed, shown with its template and stops, and it answers.
    client = ollama.Client(host=fake_ollama.host, timeout=5)
    listed = {m.model: m for m in client.list().models}
    assert listed[f"{NAME}:latest"].size == size
    shown = client.show(NAME)
    assert (
        shown.template == TEMPLATE and 'stop "<|endoftext|>"' in shown.parameters and "num_ctx 1024" in shown.parameters
    )
    assert client.chat(model=NAME, messages=[{"role": "user", "content": "hi"}]).message.content == "0"


def test_a_second_publish_uploads_nothing(fake_ollama, bundle):
    first = publish_bundle(NAME, bundle, host=fake_ollama.host, timeout_s=5)
    fake_ollama.requests.clear()
    second = publish_bundle(NAME, bundle, host=fake_ollama.host, timeout_s=5)
    assert first["uploaded"] and not second["uploaded"] and second["bytes_uploaded"] == 0
    assert calls(fake_ollama) == [("HEAD", f"/api/blobs/{digest_of(bundle)}"), ("POST", "/api/create")]
    assert {k: v for k, v in second.items() if k not in ("uploaded", "bytes_uploaded")} == {
        k: v for k, v in first.items() if k not in ("uploaded", "bytes_uploaded")
    }
    assert [m.model for m in ollama.Client(host=fake_ollama.host).list().models].count(f"{NAME}:latest") == 1


def test_the_host_defaults_to_the_settings(fake_ollama, bundle, monkeypatch):
    from gptflow.settings import load_settings

    monkeypatch.setenv("OLLAMA_HOST", fake_ollama.host)
    assert publish_bundle("mine/gpt2:q8", bundle, settings=load_settings(), timeout_s=5)["host"] == fake_ollama.host
    assert "mine/gpt2:q8" in fake_ollama.models


# -- a bad bundle or name: one line, before any request ----------------------------------------------------------
def test_a_changed_gguf_fails_before_any_request(fake_ollama, bundle):
    gguf = bundle / "model.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"!")
    with pytest.raises(GgufBundleError) as exc:
        publish_bundle(NAME, bundle, host=fake_ollama.host)
    assert one_line(exc) == (
        f"{gguf} does not match its sha256 in manifest.json (altered after export); refusing the bundle: "
        "export it again"
    )
    assert fake_ollama.requests == []


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda b: write_manifest(b, kind="lm"),
            "{b} is a language-model bundle, not gguf; run it with `python -m edge",
        ),
        (
            lambda b: write_manifest(b, format="x/1"),
            "{b}/manifest.json: expected format 'gptflow-edge-bundle/1'",
        ),
        (
            lambda b: write_manifest(b, gguf="../model.gguf"),
            "{b}/manifest.json: 'gguf' names '../model.gguf', which 'files' does not list",
        ),
        (lambda b: write_manifest(b, gguf="other.gguf"), "{b}/manifest.json: 'gguf' names 'other.gguf', which 'files'"),
        (
            lambda b: (b / "manifest.json").unlink(),
            "{b} is not an edge bundle: no manifest.json (make one with `gptflow export`)",
        ),
        (lambda b: (b / "manifest.json").write_text("{"), "{b}/manifest.json is unreadable: "),
        (
            lambda b: (b / "Modelfile").unlink(),
            "{b}: Modelfile is missing; refusing the bundle",
        ),
        (
            lambda b: ((b / "Modelfile").unlink(), write_manifest(b)),
            "{b}/manifest.json does not list Modelfile; refusing the bundle",
        ),
        (
            lambda b: ((b / "Modelfile").write_text("FROM ./weights.gguf\n"), write_manifest(b)),
            "{b}/Modelfile: FROM names ./weights.gguf, but manifest.json's 'gguf' is model.gguf; expected the same",
        ),
        (
            lambda b: (b / "Modelfile").write_text("FROM ./model.gguf\n"),
            "{b}/Modelfile does not match its sha256 in manifest.json",
        ),
    ],
    ids=[
        "kind",
        "format",
        "gguf-path",
        "gguf-unlisted",
        "no-manifest",
        "bad-json",
        "no-modelfile",
        "modelfile-unlisted",
        "from-mismatch",
        "modelfile-changed",
    ],
)
def test_a_bad_bundle_fails_clearly_before_any_request(fake_ollama, bundle, damage, expected):
    damage(bundle)
    with pytest.raises(GgufBundleError) as exc:
        publish_bundle(NAME, bundle, host=fake_ollama.host)
    assert one_line(exc).startswith(expected.format(b=bundle))
    assert fake_ollama.requests == []


def test_a_modelfile_that_does_not_parse_is_one_line(bundle):
    (bundle / "Modelfile").write_text("FROM ./model.gguf\nADAPTER ./x\n")
    write_manifest(bundle)
    with pytest.raises(ModelfileError) as exc:
        read_bundle(bundle)
    assert one_line(exc).startswith(f"{bundle}/Modelfile:2: expected FROM, TEMPLATE, SYSTEM or PARAMETER")


def test_a_bad_model_name_fails_before_any_request(fake_ollama, bundle):
    with pytest.raises(PublishError) as exc:
        publish_bundle("my model", bundle, host=fake_ollama.host)
    assert one_line(exc).startswith("model name: 'my model' is not an Ollama model name")
    assert fake_ollama.requests == []


# -- the server: unreachable, silent, or refusing ---------------------------------------------------------------
def test_a_closed_port_is_one_line_naming_the_host(bundle):
    host = closed_port_host()
    with pytest.raises(PublishError) as exc:
        publish_bundle(NAME, bundle, host=host, timeout_s=5)
    message = one_line(exc)
    assert message.startswith(f"Ollama is not reachable at {host} (HEAD /api/blobs/{digest_of(bundle)}: ")
    assert message.endswith("); start it with `ollama serve`, or point OLLAMA_HOST at it")


def test_a_server_that_never_answers_times_out_in_one_line(bundle):
    with socket.socket() as listening:  # accepts connections (the backlog does) and never answers
        listening.bind(("127.0.0.1", 0))
        listening.listen(4)
        host = "http://127.0.0.1:%d" % listening.getsockname()[1]
        with pytest.raises(PublishError) as exc:
            publish_bundle(NAME, bundle, host=host, timeout_s=0.3)
    assert one_line(exc) == f"Ollama at {host} did not answer HEAD /api/blobs/{digest_of(bundle)} within 0.3 s"


def test_a_refused_request_names_the_host_and_the_status(fake_ollama, bundle):
    host = fake_ollama.host + "/not-ollama"  # a server that is not Ollama's API: every path is a 404
    with pytest.raises(PublishError) as exc:
        publish_bundle(NAME, bundle, host=host, timeout_s=5)
    digest = digest_of(bundle)
    assert one_line(exc) == (
        f"Ollama at {host} refused the upload of model.gguf (POST /api/blobs/{digest}): HTTP 404: 404 page not found"
    )


# -- the fake server's own blob and create API, as Ollama's ---------------------------------------------------
def test_fake_server_checks_blob_digests(fake_ollama):
    data = b"some GGUF bytes"
    right = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with httpx.Client(base_url=fake_ollama.host, timeout=5) as http:
        refused = http.post(f"/api/blobs/{wrong}", content=data)
        assert refused.status_code == 400
        assert refused.json() == {"error": f'digest mismatch, expected "{wrong}", got "{right}"'}
        assert http.head(f"/api/blobs/{wrong}").status_code == 404 and fake_ollama.blobs == {}
        assert http.post("/api/blobs/sha256:xyz", content=data).json() == {"error": "invalid digest format"}
        assert http.head(f"/api/blobs/{right}").status_code == 404
        assert http.post(f"/api/blobs/{right}", content=iter([data[:4], data[4:]])).status_code == 201  # chunked
        assert http.head(f"/api/blobs/{right}").status_code == 200
        assert http.post(f"/api/blobs/{right}", content=data).status_code == 200  # already stored
    assert fake_ollama.blobs == {right: len(data)}
    assert fake_ollama.requests_to(f"/api/blobs/{wrong}")[0].body == {"bytes": len(data)}


def test_fake_server_create_needs_uploaded_blobs_and_streams(fake_ollama, tmp_path):
    client = ollama.Client(host=fake_ollama.host, timeout=5)
    missing = "sha256:" + "0" * 64
    with pytest.raises(ollama.ResponseError) as exc:
        client.create(model="x", files={"model.gguf": missing})
    assert exc.value.status_code == 400 and missing in exc.value.error and "'model.gguf'" in exc.value.error
    with pytest.raises(ollama.ResponseError, match="neither 'from' or 'files' was specified"):
        client.create(model="x")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" * 100)
    digest = client.create_blob(gguf)
    statuses = [p.status for p in client.create(model="x", files={"model.gguf": digest}, stream=True)]
    assert statuses == ["parsing GGUF", f"using existing layer {digest}", "writing manifest", "success"]
    assert client.create(model="y", from_="x", system="Be brief.").status == "success"
    assert {"x:latest", "y:latest"} <= {m.model for m in client.list().models}
    assert client.show("y").modelfile == 'FROM x\nSYSTEM """Be brief."""\n'


# -- the command ----------------------------------------------------------------------------------------------
def test_cli_publish(prefect_harness, settings, fake_ollama, bundle, capsys):
    from prefect.artifacts import Artifact

    size = (bundle / "model.gguf").stat().st_size
    assert main(["publish", NAME, str(bundle), "--host", fake_ollama.host]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"uploaded model.gguf ({size} bytes); created model {NAME} on {fake_ollama.host}",
        f"run it: OLLAMA_HOST={fake_ollama.host} ollama run {NAME}",
    ]
    table = {row["field"]: row["value"] for row in json.loads(Artifact.get(f"publish-{NAME}").data)}
    assert table["digest"] == digest_of(bundle) and table["uploaded"] is True and table["parameter num_ctx"] == 1024
    assert main(["publish", NAME, str(bundle), "--host", fake_ollama.host]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"model.gguf ({size} bytes) already there; created model {NAME} on {fake_ollama.host}"
    )
    assert [r.method for r in fake_ollama.requests_to(f"/api/blobs/{digest_of(bundle)}")] == ["HEAD", "POST", "HEAD"]
    gguf = bundle / "model.gguf"  # checked again in the flow: a changed file is one line there too
    gguf.write_bytes(gguf.read_bytes() + b"!")
    assert main(["publish", NAME, str(bundle), "--host", fake_ollama.host]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptflow publish: error: {gguf} does not match its sha256") and err.count("\n") == 1


def test_cli_publish_bad_input_is_one_line_before_any_flow(settings, fake_ollama, bundle, tmp_path, capsys):
    cases = [
        (
            ["publish", NAME, str(tmp_path / "nothing")],
            f"{tmp_path / 'nothing'} does not exist; expected a GGUF bundle",
        ),
        (["publish", "bad name", str(bundle)], "model name: 'bad name' is not an Ollama model name"),
        (["publish", NAME, str(bundle), "--host", "ftp://x"], "--host: 'ftp://x': scheme 'ftp' is not http or https"),
    ]
    write_manifest(bundle, kind="lm")
    cases.append((["publish", NAME, str(bundle)], f"{bundle} is a language-model bundle, not gguf; run it with"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"gptflow publish: error: {expected}") and err.count("\n") == 1, err
    assert fake_ollama.requests == []
