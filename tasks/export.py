"""Prefect task of the export stage: quantize, export, parity, int8 gate, edge bundle; publish the figures."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gptflow.tokenizer import get_tokenizer, tokenizer_files
from model.onnx_export import ExportConfig, export_classifier
from tasks.artifacts import artifact_key, publish_table


@task(cache_policy=NO_CACHE)
def export_bundle(checkpoint: str, data_dir: str, config: ExportConfig, out_dir: str | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    report = export_classifier(
        checkpoint, data_dir, out_dir, config, tokenizer=get_tokenizer(), tokenizer_files=tokenizer_files()
    )
    logger.info("%s bundle %s", "reused" if report["reused"] else "wrote", report["bundle"])
    logger.info("test accuracy %s; parity %s", report["accuracy"], report["parity"])
    sizes = report["sizes_bytes"]
    rows = [{"model": name, "test_accuracy": round(acc, 4)} for name, acc in report["accuracy"].items()]
    files = {"torch_fp32": "torch_checkpoint", "onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx"}
    for row in rows:
        size = sizes.get(files.get(row["model"], ""))
        row["file_mb"] = round(size / 1e6, 2) if size else None
    key = artifact_key("export", report["checkpoint_sha256"][:12])
    publish_table(rows, f"{key}-accuracy", "export: test accuracy and file size per model")
    publish_table(
        [{"check": k, "value": v} for k, v in report["parity"].items()],
        f"{key}-parity",
        "export: ONNX parity on the test split",
    )
    return report
