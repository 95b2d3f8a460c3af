"""Prefect tasks of the inspect stage: one checkpoint's introspection report on one probe text, and its artifacts
(each figure a plot, the numbers tables, the report a link). Any family (GPT-2, Llama, Qwen3), read with the
model's own tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from eval.introspection import headline, render_inspection, table_rows
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import read_json, write_json_atomic
from model.configs import InspectConfig
from model.introspect import inspect_model, load_subject, open_subject
from tasks.artifacts import artifact_key, publish_link, publish_plot, publish_table

SUMMARY = "summary.json"
TABLES = {
    "tokens": "tokens: text piece, id, position",
    "trace": "forward-pass trace: shape, mean, std and first values per step",
    "heads": "attention heads: weight on the previous token, the first token and itself; entropy",
    "next-token": "next-token top-k after the final layer",
    "classes": "class probabilities",
    "logit-lens": "logit lens: top-1 token read out after every block, per position",
    "sampling": "next-token distribution under temperature, top-k and top-p",
}


def inspection_stage(
    checkpoint: Path, text: str, config: InspectConfig, out_dir: str | None, force: bool = False
) -> Stage:
    """Keyed by the checkpoint's hash, the probe text and what is drawn; folder `<home>/inspect/<model>-<key>`."""
    label = (
        checkpoint.parent.name if checkpoint.name in ("model.pt", "best.pt", "model.safetensors") else checkpoint.stem
    )
    return Stage.declare(
        "inspect",
        inputs={"checkpoint": checkpoint, "text": text},
        config=config,
        code=__name__,
        label=label,
        out_dir=out_dir,
        force=force,
    )


@task(cache_policy=NO_CACHE)
def inspect_checkpoint(
    checkpoint: str,
    text: str,
    config: InspectConfig,
    out_dir: str | None = None,
    resume: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Write report.md, report.json, attention.npy and the PNGs into the stage folder (reused when done)."""
    logger = get_run_logger()
    opened = open_subject(checkpoint)
    path = opened.path
    stage = inspection_stage(path, text, config, out_dir, force)

    def build(decision: Decision) -> Built:
        report = inspect_model(load_subject(opened), text, config, opened.tokenizer())  # the model's own
        files = render_inspection(report, stage.dir)
        summary = {
            "checkpoint": str(path),
            "kind": report["kind"],
            "text": text,
            "out_dir": str(stage.dir),
            "report": files["report"],
            "json": files["json"],
            "attention": files["attention"],
            "figures": files["figures"],
            "metrics": headline(report),
        }
        write_json_atomic(stage.dir / SUMMARY, summary)
        outputs = [Path(p).name for p in (files["report"], files["json"], files["attention"])]
        outputs += sorted(Path(p).name for p in files["figures"].values())
        logger.info("inspected %s (%s) on %d tokens: %s", path, report["kind"], len(report["tokens"]), files["report"])
        return Built([SUMMARY, *outputs], summary["metrics"])

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / SUMMARY), "reused": result.reused}


@task(cache_policy=NO_CACHE)
def publish_inspection(result: dict[str, Any]) -> None:
    """Every figure as a plot artifact, the numbers as tables, the report as a link."""
    report = read_json(result["json"])
    key = artifact_key("inspect", Path(result["out_dir"]).name)
    name = Path(result["checkpoint"]).parent.name
    for table, rows in table_rows(report).items():
        publish_table(rows, f"{key}-{table}-table", f"{name}: {TABLES.get(table, table)}")  # figures share names
    for figure, png in result["figures"].items():
        publish_plot(png, f"{key}-{figure}", f"{name}: {figure.replace('-', ' ')} for {result['text']!r}")
    publish_link(result["report"], f"{key}-report", f"{name}: the inspection report on disk")
