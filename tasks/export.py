"""Prefect tasks of the export stage: the classifier's edge bundle, the language model's bundle, its Hugging Face
folder, its GGUF bundle and a LoRA model's peft adapter; each publishes its figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.configs import ExportConfig
from model.gguf_export import export_gguf
from model.hf_export import export_hf
from model.lm_export import export_lm, model_rows
from model.onnx_export import MODEL_FILES, export_classifier
from model.peft_export import export_peft
from tasks.artifacts import artifact_key, publish_markdown, publish_table


@task(cache_policy=NO_CACHE)
def export_bundle(
    checkpoint: str, data_dir: str, config: ExportConfig, out_dir: str | None = None, force: bool = False
) -> dict[str, Any]:
    """The classifier's edge bundle; its texts are read with the classifier's own tokenizer (the Hugging Face one its
    checkpoint keeps, else GPT-2's BPE, whose files are fetched only then)."""
    logger = get_run_logger()
    report = export_classifier(checkpoint, data_dir, out_dir, config, force=force)
    logger.info("%s classifier bundle %s", "reused" if report["reused"] else "wrote", report["bundle"])
    logger.info("test accuracy %s; parity %s", report["accuracy"], report["parity"])
    sizes = report["sizes_bytes"]
    rows = [{"model": name, "test_accuracy": round(acc, 4)} for name, acc in report["accuracy"].items()]
    for row in rows:
        size = sizes.get(MODEL_FILES.get(row["model"], ""))
        row["file_mb"] = round(size / 1e6, 2) if size else None
    key = artifact_key("export", report["checkpoint_sha256"][:12])
    publish_table(rows, f"{key}-accuracy", "export: test accuracy and file size per model")
    publish_table(
        [{"check": k, "value": v} for k, v in report["parity"].items()],
        f"{key}-parity",
        "export: ONNX parity on the test split",
    )
    return report


@task(cache_policy=NO_CACHE)
def export_lm_bundle(
    checkpoint: str, data_dir: str | None, config: ExportConfig, out_dir: str | None = None, force: bool = False
) -> dict[str, Any]:
    """The LM bundle of any family; the model's own tokenizer (or GPT-2's files, fetched when it reads GPT-2's
    vocabulary). `data_dir` None: no perplexity, unless int8 finds the checkpoint's own data (model.lm_export)."""
    logger = get_run_logger()
    report = export_lm(checkpoint, data_dir, out_dir, config, force=force)
    q = report["quality"]
    logger.info("%s %s LM bundle %s", "reused" if report["reused"] else "wrote", report.get("family"), report["bundle"])
    logger.info("perplexity %s (data %s); parity %s", q.get("perplexity"), report.get("data"), q["parity"])
    key = artifact_key("export-lm", report["checkpoint_sha256"][:12])
    publish_table(
        model_rows(report), f"{key}-models", "LM export: file size, validation perplexity and tokens/s per model"
    )
    checks = [{"check": f"parity: {k}", "value": v} for k, v in q["parity"].items()]
    if "int8_agreement" in q:
        checks.append({"check": "int8 perplexity increase %", "value": round(q["int8_perplexity_increase_pct"], 3)})
        checks += [{"check": f"int8 {k}", "value": v} for k, v in q["int8_agreement"].items()]
    publish_table(checks, f"{key}-checks", "LM export: ONNX parity with PyTorch and int8 agreement with fp32")
    publish_markdown((Path(report["bundle"]) / "card.md").read_text(encoding="utf-8"), f"{key}-card", "LM bundle card")
    return report


@task(cache_policy=NO_CACHE)
def export_hf_folder(checkpoint: str, out_dir: str | None = None, force: bool = False) -> dict[str, Any]:
    report = export_hf(checkpoint, out_dir, force=force)
    get_run_logger().info(
        "%s Hugging Face %s folder %s",
        "reused" if report["reused"] else "wrote",
        report.get("architecture", "GPT2LMHeadModel"),
        report["folder"],
    )
    return report


@task(cache_policy=NO_CACHE)
def export_peft_adapter(checkpoint: str, out_dir: str | None = None, force: bool = False) -> dict[str, Any]:
    """A LoRA language model's adapters as a peft adapter folder, for our Hugging Face export of its base."""
    report = export_peft(checkpoint, out_dir, force=force)
    get_run_logger().info(
        "%s peft adapter (rank %s, %s; %.2f MB) %s",
        "reused" if report["reused"] else "wrote",
        report["rank"],
        ", ".join(report["target_modules"]),
        report["sizes_bytes"]["adapter_model.safetensors"] / 1e6,
        report["folder"],
    )
    return report


@task(cache_policy=NO_CACHE)
def export_gguf_bundle(
    checkpoint: str, config: ExportConfig, out_dir: str | None = None, force: bool = False
) -> dict[str, Any]:
    """The GGUF bundle (llama.cpp, Ollama) of a language model of any family, in `config.quant`."""
    report = export_gguf(checkpoint, out_dir, config, force=force)
    get_run_logger().info(
        "%s %s GGUF bundle %s (%s, %.1f MB)",
        "reused" if report["reused"] else "wrote",
        report["family"],
        report["bundle"],
        report["quant"],
        report["sizes_bytes"]["model.gguf"] / 1e6,
    )
    key = artifact_key("export-gguf", report["checkpoint_sha256"][:12])
    rows = [{"tensor type": name, "tensors": n} for name, n in sorted(report["tensor_types"].items())]
    publish_table(rows, f"{key}-types", f"GGUF export ({report['quant']}): tensors per type")
    publish_markdown((Path(report["bundle"]) / "card.md").read_text(encoding="utf-8"), f"{key}-card", "GGUF card")
    return report
