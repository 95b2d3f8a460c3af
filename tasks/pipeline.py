"""The pipeline's closing task: the run report (model card) in the run's own folder and in the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel

from eval.run_report import data_summary, promotion_rows, render_run_report, source_rows, stage_rows
from gptflow.settings import get_settings
from gptflow.storage import write_json_atomic, write_text_atomic
from tasks.artifacts import publish_link, publish_markdown, publish_table


def _deliverables(stages: dict[str, dict[str, Any]]) -> dict[str, str]:
    wanted = {
        "classifier checkpoint": ("classifier", "best"),
        "edge bundle": ("export", "bundle"),
        "instruction model": ("instruct", "model"),
        "test responses": ("instruct", "responses"),
        "evaluation report": ("evaluate", "out_dir"),
        "LM edge bundle": ("export-lm", "bundle"),
        "GGUF bundle (llama.cpp, Ollama)": ("export-gguf", "bundle"),
        "base model inspection": ("inspect-base", "report"),
        "instruction model inspection": ("inspect-instruct", "report"),
    }
    found = {}
    for name, (stage, key) in wanted.items():
        value = stages.get(stage, {}).get(key)
        if value:
            found[name] = str(value)
    return found


@task(cache_policy=NO_CACHE)
def write_run_report(
    params: BaseModel,
    stages: dict[str, dict[str, Any]],
    sources: dict[str, dict[str, Any]] | None = None,
    promotions: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write `<home>/runs/<run name>/report.md` + `summary.json`, publish them, and say where everything is.
    `sources`: what the data check found per input; `promotions`: each registry's champion decision."""
    run_name = flow_run.get_name() or "local"
    run_dir = Path(get_settings().stage_dir("runs")) / run_name
    deliverables = _deliverables(stages)
    checks = list((sources or {}).values())
    markdown = render_run_report(run_name, params.model_dump(mode="json"), stages, deliverables, checks, promotions)
    report = write_text_atomic(run_dir / "report.md", markdown)
    summary = {
        "run": run_name,
        "report": str(report),
        "data": data_summary(checks) if checks else None,
        "sources": checks,
        "promotions": promotions or {},
        "deliverables": deliverables,
        "stages": stage_rows(stages),
    }
    write_json_atomic(run_dir / "summary.json", summary)

    publish_markdown(markdown, "pipeline-report", "run report: data, stages, champions, lineage, parameters")
    publish_table(summary["stages"], "pipeline-stages", "pipeline: status, metrics and outputs per stage")
    if checks:
        publish_table(source_rows(checks), "pipeline-data-sources", f"data: {summary['data']}")
    if promotions:
        publish_table(promotion_rows(promotions), "pipeline-promotions", "champion vs challenger per registry")
    publish_link(report, "pipeline-report-file", "the run report on disk")
    logger = get_run_logger()
    logger.info("run report: %s", report)
    if checks:
        logger.info("data: %s", summary["data"])
    for name, path in deliverables.items():
        logger.info("%s: %s", name, path)
    return summary
