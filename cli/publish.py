"""`gptflow publish NAME BUNDLE [--host URL]`: a GGUF bundle into an Ollama server, as model NAME."""

from __future__ import annotations

import argparse

from gptflow.errors import GptflowError


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "publish",
        help="put a GGUF bundle into an Ollama server as model NAME (then: ollama run NAME)",
        description="BUNDLE is the folder `gptflow export MODEL --format gguf` writes: its GGUF, Modelfile and "
        "manifest.json. The bundle is checked first (its kind, the Modelfile naming its GGUF, every sha256). The GGUF "
        "is uploaded as a blob only when the server does not hold it yet (HEAD /api/blobs/sha256:...), then "
        "/api/create makes model NAME with the Modelfile's template, system prompt and parameters (stop tokens, "
        "num_ctx, sampling). Publishing the same bundle again uploads nothing.",
    )
    p.add_argument("name", metavar="NAME", help="the Ollama model name, e.g. gpt2-spam or mine/gpt2:q8")
    p.add_argument("bundle", metavar="BUNDLE", help="a GGUF bundle folder (gptflow export MODEL --format gguf)")
    p.add_argument("--host", metavar="URL", help="the Ollama server (default: OLLAMA_HOST, http://localhost:11434)")
    p.set_defaults(handler=run_publish, precheck=_check_publish)


def _check_publish(args: argparse.Namespace) -> None:
    """NAME, --host and the bundle's files (not their hashes: the flow checks those) before any flow starts."""
    from gptflow.ollama_publish import check_model_name, read_bundle
    from gptflow.settings import ollama_url

    check_model_name(args.name)
    if args.host is not None:
        try:
            ollama_url(args.host)
        except ValueError as exc:
            raise GptflowError(f"--host: {exc}") from None
    read_bundle(args.bundle, verify=False)


def run_publish(args: argparse.Namespace) -> int:
    from flows.publish import publish_flow

    report = publish_flow(args.name, args.bundle, args.host)
    size = f"{report['bytes'] / 1e6:.1f} MB" if report["bytes"] >= 100_000 else f"{report['bytes']} bytes"
    blob = f"uploaded {report['gguf']} ({size})" if report["uploaded"] else f"{report['gguf']} ({size}) already there"
    print(f"{blob}; created model {report['name']} on {report['host']}")
    where = "" if args.host is None else f"OLLAMA_HOST={report['host']} "
    print(f"run it: {where}ollama run {report['name']}")
    return 0
