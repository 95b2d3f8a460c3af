"""Publishing results to the Prefect UI: tables, markdown, plots and links.

Artifact keys must be lowercase letters, digits and dashes; `artifact_key` makes any name fit.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)


def artifact_key(*parts: str) -> str:
    key = "-".join(p for p in parts if p)
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", key.lower())).strip("-")[:100]


def publish_table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    create_table_artifact(table=rows, key=artifact_key(key), description=description)


def publish_markdown(markdown: str, key: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


def publish_link(path: str | Path, key: str, description: str) -> None:
    path = Path(path).resolve()
    create_link_artifact(link=path.as_uri(), link_text=str(path), key=artifact_key(key), description=description)


def publish_plot(png: str | Path, key: str, description: str) -> None:
    """A PNG shown inline on the artifact's page: markdown with the image as a base64 data URL.

    Checked in the real UI of Prefect 3.8.8 (scripts/e2e.py does it on every run): both the V2 (default) and
    the V1 UI render it as a decoded `<img>`. An image artifact (`create_image_artifact` with a data URL) also
    renders, but prints the whole base64 URL as an "Image URL" link across the page.
    """
    encoded = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    markdown = f"### {description}\n\n![{Path(png).name}](data:image/png;base64,{encoded})\n\n`{png}`\n"
    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


class TrainingProgress:
    """A training stage's progress artifact (0-100 %), keyed by its stage folder's name, which the training loop's
    "start" record gives (a reused stage trains nothing: `finish` names it then).

    Updates are throttled (`min_interval_s`) so a fast loop does not flood the API; `finish()` sets 100 %.
    """

    def __init__(self, stage: str, min_interval_s: float = 5.0) -> None:
        self._stage, self._min_interval_s = stage, min_interval_s
        self._id = None
        self._last = 0.0

    def start(self, folder: str) -> None:
        name = Path(folder).name
        key = artifact_key(self._stage, name, "progress")
        self._id = create_progress_artifact(0.0, key=key, description=f"{name}: training done")

    def update(self, fraction: float) -> None:
        now = time.monotonic()
        if self._id is not None and now - self._last >= self._min_interval_s:
            update_progress_artifact(self._id, round(100.0 * min(max(fraction, 0.0), 1.0), 1))
            self._last = now

    def finish(self, folder: str | Path) -> None:
        if self._id is None:
            self.start(str(folder))
        update_progress_artifact(self._id, 100.0)


def training_logger(stage: str, fraction: Callable[[dict[str, Any]], float]) -> tuple[Callable, TrainingProgress]:
    """A training stage's `on_log`: one log line per record of the training loop and a progress artifact moved by
    `fraction(record)`; returns (on_log, the progress artifact)."""
    logger = get_run_logger()
    progress = TrainingProgress(stage)

    def on_log(m: dict[str, Any]) -> None:
        if m["kind"] == "resume":
            logger.info("resumed from %s at step %d", m["checkpoint"], m["step"])
            return
        if m["kind"] == "start":
            progress.start(m["folder"])
            return
        progress.update(fraction(m))
        epoch = f" (epoch {m['epoch']:.2f})" if "epoch" in m else ""
        values = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k not in ("step", "epoch") and isinstance(v, float))
        best = ", best so far" if m.get("best") else ""
        sample = f" | sample {m['sample']!r}" if "sample" in m else ""
        logger.info("step %d%s %s: %s%s%s", m["step"], epoch, m["kind"], values, best, sample)

    return on_log, progress


def publish_training_result(result: Any, plot: Path, stage: str, what: str) -> None:
    """A training stage's final metrics table and loss curve (`result` has out_dir and metrics)."""
    name = result.out_dir.name
    key = artifact_key(stage, name)
    publish_table([{"metric": k, "value": v} for k, v in result.metrics.items()], key, f"{name}: final {what} metrics")
    publish_plot(plot, f"{key}-loss", f"{name}: training and validation loss")
