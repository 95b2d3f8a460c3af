"""Publish flow: a GGUF bundle (`gptflow export MODEL --format gguf`) into an Ollama server as a named model."""

from __future__ import annotations

from prefect import flow

from tasks.publish import publish_to_ollama


@flow(name="publish")
def publish_flow(name: str, bundle: str, host: str | None = None) -> dict:
    """Create Ollama model `name` from `bundle` on `host` (default OLLAMA_HOST): the GGUF's blob is uploaded only
    when the server lacks it, then /api/create names the model with the Modelfile's template and parameters."""
    return publish_to_ollama(name, str(bundle), host)
