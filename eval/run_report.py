"""The pipeline's run report: a model card that traces every artifact to its inputs, config and code.

Built from the stage folders' manifests, so it states what is on disk rather than what a flow believed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptflow.markdown import markdown_table
from gptflow.storage import MANIFEST_NAME


def _manifest(stage_dir: str | Path | None) -> dict[str, Any]:
    if not stage_dir:
        return {}
    path = Path(stage_dir) / MANIFEST_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _short(digest: str) -> str:
    return digest[:12]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)[:120]
    return str(value)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"test": {"accuracy": 0.98}} -> {"test.accuracy": 0.98}; lists are left out (curves, not headlines)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def stage_rows(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage: status, where its outputs are, its code version and its headline metrics."""
    rows = []
    for name, result in stages.items():
        manifest = _manifest(result.get("out_dir"))
        metrics = result.get("metrics") or manifest.get("metrics") or {}
        rows.append(
            {
                "stage": name,
                "status": "reused" if result.get("reused") else result.get("status") or "done",
                "out_dir": str(result.get("out_dir", "")),
                "code_version": manifest.get("code_version", ""),
                "metrics": ", ".join(f"{k}={_fmt(v)}" for k, v in _flat(metrics).items()),
            }
        )
    return rows


def data_summary(sources: list[dict[str, Any]]) -> str:
    """One line for the whole run: whether any input changed since the last run, and since when if not."""
    tracked = [s for s in sources if s["status"] != "pinned"]
    changed = [s for s in tracked if s["status"] in ("new", "changed")]
    if changed:
        return "; ".join(f"{s['role']}: {s['note']}" for s in changed)
    if tracked:
        since = max(tracked, key=lambda s: s["since"])
        return f"data unchanged since run {since['since_run']} ({since['since']})"
    return "every input is pinned by sha256"


def source_rows(sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "input": s["role"],
            "source": s["ref"],
            "status": s["status"],
            "checked by": s["how"],
            "sha256": (s["sha256"] or "")[:12],
            "note": s["note"],
        }
        for s in sources
    ]


def promotion_rows(promotions: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for outcome in promotions.values():
        verdict = outcome["verdict"]
        rows.append(
            {
                "registry": outcome["registry"],
                "decision": outcome["status"],
                "metric": verdict["metric"],
                "challenger": _fmt(verdict["challenger"]),
                "champion before": outcome["champion_before"] or "-",
                "champion now": outcome["champion"] or "-",
                "reason": verdict["reason"],
                "ollama": _ollama(outcome.get("ollama")),
            }
        )
    return rows


def _ollama(published: dict[str, Any] | None) -> str:
    if not published:
        return "-"
    return f"published as {published['model']}" if published["published"] else f"not published: {published['reason']}"


def render_run_report(
    run_name: str,
    params: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    deliverables: dict[str, str],
    sources: list[dict[str, Any]] | None = None,
    promotions: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Markdown: data freshness, summary table, champion decisions, deliverables, data lineage (input and output
    hashes), and the parameters."""
    lines = [f"# gptflow run `{run_name}`", ""]
    if sources:
        lines += ["## Data", "", f"**{data_summary(sources)}**", ""]
        lines += markdown_table(source_rows(sources)) + [""]
    if promotions:
        lines += ["## Champion vs challenger", ""] + markdown_table(promotion_rows(promotions)) + [""]
        for outcome in promotions.values():
            if outcome.get("pairwise"):
                lines += [f"{outcome['registry']}, judged pairwise (A: this run's model, B: the champion):", ""]
                lines += markdown_table([outcome["pairwise"]["row"]]) + [""]
    lines += [
        "## Stages",
        "",
        "| stage | status | metrics | outputs |",
        "|---|---|---|---|",
    ]
    for row in stage_rows(stages):
        lines.append(f"| {row['stage']} | {row['status']} | {row['metrics']} | `{row['out_dir']}` |")
    if deliverables:
        lines += ["", "## Deliverables", ""]
        lines += [f"- **{name}**: `{path}`" for name, path in deliverables.items()]
    lines += ["", "## Lineage", ""]
    for name, result in stages.items():
        manifest = _manifest(result.get("out_dir"))
        if not manifest:
            reason = result.get("reason")
            lines.append(f"- **{name}**: no manifest" + (f" ({reason})" if reason else ""))
            continue
        inputs = ", ".join(f"{k} `{_short(v)}`" for k, v in manifest.get("inputs", {}).items())
        outputs = ", ".join(f"{k} `{_short(v)}`" for k, v in manifest.get("outputs", {}).items())
        lines.append(
            f"- **{name}** (commit `{manifest.get('code_version', '?')}`, finished "
            f"{manifest.get('finished', '?')}): inputs {inputs or '-'}; outputs {outputs or '-'}"
        )
    lines += ["", "## Parameters", "", "```json", json.dumps(params, indent=2, default=str), "```", ""]
    return "\n".join(lines)
