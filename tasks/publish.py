"""The Prefect task of `gptflow publish`: a GGUF bundle into an Ollama server (gptflow.ollama_publish)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gptflow.ollama_publish import publish_bundle
from tasks.artifacts import artifact_key, publish_table


@task(name="publish-ollama", cache_policy=NO_CACHE)
def publish_to_ollama(name: str, bundle: str, host: str | None = None) -> dict[str, Any]:
    """Create model `name` on the Ollama server at `host` (default OLLAMA_HOST) from the GGUF bundle `bundle`; the
    GGUF is uploaded only when the server lacks its blob. No cache: the server, not the run, knows what it holds."""
    report = publish_bundle(name, bundle, host)
    get_run_logger().info(
        "%s %s (%s, %d bytes); created model %s on %s",
        "uploaded" if report["uploaded"] else "the server already had",
        report["gguf"],
        report["digest"],
        report["bytes"],
        report["name"],
        report["host"],
    )
    rows = [
        {"field": field, "value": report[field]}
        for field in ("name", "host", "bundle", "digest", "uploaded", "bytes", "family", "quant", "status")
    ]
    rows.append({"field": "stops", "value": ", ".join(report["stops"])})
    rows += [{"field": f"parameter {k}", "value": v} for k, v in report["parameters"].items() if k != "stop"]
    publish_table(rows, artifact_key("publish", report["name"]), f"publish: model {report['name']} on {report['host']}")
    return report
