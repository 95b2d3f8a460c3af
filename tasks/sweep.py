"""The report of a hyper-parameter sweep: one table of its variants, best validation accuracy first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from model.sweep import variant_label
from tasks.artifacts import artifact_key, publish_table

SPLITS = ("train", "validation", "test")


@task(cache_policy=NO_CACHE)
def report_sweep(data_dir: str, fields: list[dict[str, Any]], results: list[Any]) -> list[dict[str, Any]]:
    """`results[i]`: variant i's classifier (tasks.classify.train_classifier), or the exception that stopped it.
    Publishes the table and returns the variants, each {"variant": i, "fields": its grid values, the classifier's
    outputs or "error"}, best validation accuracy first and failed ones last."""
    variants = [
        {"variant": i, "fields": f, **({"error": f"{type(r).__name__}: {r}"} if isinstance(r, BaseException) else r)}
        for i, (f, r) in enumerate(zip(fields, results), start=1)
    ]
    variants.sort(key=lambda v: -v["metrics"]["validation"]["accuracy"] if "metrics" in v else 1.0)
    rows = [
        {
            "variant": v["variant"],
            **v["fields"],
            **{f"{s}_accuracy": round(v["metrics"][s]["accuracy"], 4) if "metrics" in v else None for s in SPLITS},
            "checkpoint": v.get("best"),
            "error": v.get("error"),
        }
        for v in variants
    ]
    name = Path(data_dir).name
    publish_table(rows, artifact_key("sweep", name), f"{name}: sweep of {len(rows)} variants, best validation first")
    logger = get_run_logger()
    for v in variants:
        outcome = v.get("error") or f"validation accuracy {v['metrics']['validation']['accuracy']:.4f}"
        logger.info("variant %d (%s): %s", v["variant"], variant_label(v["fields"]), outcome)
    return variants
