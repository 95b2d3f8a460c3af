"""Judge a responses file and write the evaluation report: per-item CSV, JSON summary, markdown, histograms."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eval.judge import JudgeConfig, Judgement, OllamaJudge, judge_prompt
from eval.stats import paired_difference, summarize
from gptflow.errors import GptflowError
from gptflow.markdown import markdown_table
from gptflow.stage import Stage
from gptflow.storage import atomic_path, read_json, write_json_atomic, write_text_atomic

SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.md"
SCORES_NAME = "scores.csv"
HISTOGRAM_BINS = list(range(0, 101, 10))
DEFAULT_RESPONSE_KEY = "model_response"


class ResponsesFileError(GptflowError, ValueError):
    """The responses file is not a JSON list of entries with the fields the judge needs."""


def load_responses(path: str | Path, response_keys: Sequence[str]) -> list[dict]:
    """Read and check a responses file: a JSON list of objects with instruction, output and each response key."""
    path = Path(path)
    if not response_keys:
        raise ResponsesFileError("no response key given: name at least one field to score (--response-key)")
    if repeated := [k for i, k in enumerate(response_keys) if k in response_keys[:i]]:
        raise ResponsesFileError(f"response key {repeated[0]!r} given twice: name each field to score once")
    if path.is_dir():
        raise ResponsesFileError(f"{path}: is a folder, not a file (expected a JSON list of entries)")
    if not path.is_file():
        raise ResponsesFileError(f"{path}: no such file (expected a JSON list of entries)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResponsesFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not data:
        what = "an empty list" if isinstance(data, list) else f"a JSON {type(data).__name__}"
        raise ResponsesFileError(f"{path}: expected a non-empty JSON list of entries, got {what}")
    required = ("instruction", "output", *response_keys)
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ResponsesFileError(
                f"{path}: entry {index} is a {type(entry).__name__}, expected an object with keys {', '.join(required)}"
            )
        for key in required:
            if key not in entry:
                raise ResponsesFileError(
                    f"{path}: entry {index} has no {key!r} key (expected "
                    f"{', '.join(required)}; found {', '.join(entry) or 'none'})"
                )
        for key in (*required, "input"):
            if key in entry and not isinstance(entry[key], str):
                raise ResponsesFileError(
                    f"{path}: entry {index}: {key!r} must be a string, got {type(entry[key]).__name__}"
                )
    return data


def evaluation_stage(
    path: str | Path,
    response_keys: Sequence[str],
    judge: JudgeConfig,
    out_dir: str | Path | None = None,
    force: bool = False,
) -> Stage:
    """The evaluate stage of a responses file: keyed on the file, the scored fields and what decides a judgement
    (model, options, output format; not the host or timing). `force`: `out_dir` may hold files gptflow did not
    write."""
    return Stage.declare(
        "evaluate",
        inputs={"responses": Path(path)},
        code=__name__,
        label=Path(path).stem,
        config={"response_keys": list(response_keys), "judge": judge.identity()},
        out_dir=out_dir,
        force=force,
    )


def evaluate_responses(
    entries: list[dict],
    response_keys: Sequence[str],
    judge: OllamaJudge,
    out_dir: str | Path,
    source: str | None = None,
    judge_info: dict | None = None,
) -> dict[str, Any]:
    """Score every response field of every entry and write the report into out_dir; return the summary."""
    out_dir = Path(out_dir)
    keys = list(response_keys)
    n = len(entries)
    judgements = judge.ask_many(judge_prompt(e, k) for k in keys for e in entries)
    per_key = {k: judgements[i * n : (i + 1) * n] for i, k in enumerate(keys)}

    fields = {}
    for key, js in per_key.items():
        scores = [j.value for j in js if j.value is not None]
        unscored = [{"index": i, "reason": j.reason} for i, j in enumerate(js) if j.value is None]
        histogram = f"hist-{slug(key)}.png"
        write_histogram(scores, out_dir / histogram, title=f"{key}: judge scores (n={len(scores)})")
        stats = summarize(scores)
        fields[key] = {
            "n_scored": stats.pop("n"),
            "n_unscored": len(unscored),
            **stats,
            "unscored_reasons": dict(Counter(_reason_kind(u["reason"]) for u in unscored)),
            "unscored": unscored,
            "scores": [j.value for j in js],  # per entry, None when unscored: what agreement between judges reads
            "from_cache": sum(j.cached for j in js),
            "histogram": histogram,
        }

    paired = None
    if len(keys) == 2:
        a, b = per_key[keys[0]], per_key[keys[1]]
        both = [(x.value, y.value) for x, y in zip(a, b) if x.value is not None and y.value is not None]
        paired = {
            "a": keys[0],
            "b": keys[1],
            "n_excluded": n - len(both),
            **paired_difference([x for x, _ in both], [y for _, y in both]),
        }

    summary = {
        "status": "completed",
        "source": source,
        "n_entries": n,
        "response_keys": keys,
        "judge": {**(judge_info or {"host": judge.config.host}), **judge.identity()},
        "requests_sent": judge.requests_sent,
        "fields": fields,
        "paired": paired,
    }
    write_text_atomic(out_dir / SCORES_NAME, scores_csv(entries, per_key))
    write_json_atomic(out_dir / SUMMARY_NAME, summary)
    write_text_atomic(out_dir / REPORT_NAME, report_markdown(summary))
    return read_json(out_dir / SUMMARY_NAME)  # JSON types (lists, not tuples), as a resumed stage returns it


def skipped_report(out_dir: str | Path, reason: str, source: str | None, response_keys: Sequence[str]) -> dict:
    """Record that the evaluation did not run (the judge was unavailable): nothing is scored, nothing faked."""
    summary = {"status": "skipped", "reason": reason, "source": source, "response_keys": list(response_keys)}
    write_json_atomic(Path(out_dir) / SUMMARY_NAME, summary)
    write_text_atomic(Path(out_dir) / REPORT_NAME, report_markdown(summary))
    return summary


def summary_rows(summary: dict) -> list[dict[str, Any]]:
    """One row per response field, formatted for tables (CLI, Prefect, markdown)."""
    rows = []
    for key, f in summary["fields"].items():
        ci = f["ci95"]
        rows.append(
            {
                "field": key,
                "scored": f["n_scored"],
                "unscored": f["n_unscored"],
                "mean": _fmt(f["mean"]),
                "median": _fmt(f["median"]),
                "std": _fmt(f["std"]),
                "95% CI": f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-",
            }
        )
    return rows


def paired_line(paired: dict) -> str:
    ci = paired["ci95"]
    ci_text = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
    return (
        f"{paired['a']} - {paired['b']}: mean difference {_fmt(paired['mean_diff'])}, 95% CI {ci_text} "
        f"over {paired['n']} paired items ({paired['n_excluded']} excluded as unscored); "
        f"wins/ties/losses {paired['wins']}/{paired['ties']}/{paired['losses']}"
    )


def report_markdown(summary: dict) -> str:
    lines = ["# Judge evaluation", ""]
    if summary.get("source"):
        lines += [f"Responses: `{summary['source']}`", ""]
    if summary["status"] == "skipped":
        return "\n".join(
            lines
            + [
                f"**Skipped**: {summary['reason']}",
                "",
                "No response was scored; rerun when the judge is available.",
                "",
            ]
        )
    judge = summary["judge"]
    lines += [
        f"Judge: `{judge['model']}` at {judge.get('host')} (digest `{judge.get('digest')}`), "
        f"options `{json.dumps(judge['options'])}`, structured output: {judge['format'] is not None}. "
        f"{summary['n_entries']} entries; {summary['requests_sent']} judge requests sent this run.",
        "",
    ]
    lines += markdown_table(summary_rows(summary))
    lines.append("")
    if summary["paired"]:
        lines += ["Paired: " + paired_line(summary["paired"]), ""]
    for key, f in summary["fields"].items():
        if f["unscored"]:
            lines += [f"Unscored `{key}` items (counted, not dropped):", ""]
            lines += [f"- entry {u['index']}: {u['reason']}" for u in f["unscored"]]
            lines.append("")
    lines += [f"![{key} histogram]({f['histogram']})" for key, f in summary["fields"].items()]
    return "\n".join(lines) + "\n"


def scores_csv(entries: list[dict], per_key: dict[str, list[Judgement]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["index", "instruction", "input", "output"]
    for key in per_key:
        header += [key, f"{key}_score", f"{key}_judge_reply", f"{key}_unscored_reason"]
    writer.writerow(header)
    for i, entry in enumerate(entries):
        row = [i, entry["instruction"], entry.get("input", ""), entry["output"]]
        for key, js in per_key.items():
            row += [entry[key], "" if js[i].value is None else js[i].value, js[i].reply, js[i].reason or ""]
        writer.writerow(row)
    return buffer.getvalue()


def write_histogram(scores: Sequence[int], path: Path, title: str) -> Path:
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(scores, bins=HISTOGRAM_BINS, color="#4c72b0", edgecolor="white")
    ax.set(xlim=(0, 100), xlabel="score", ylabel="responses", title=title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _reason_kind(reason: str) -> str:
    """The kind of a reason, for counting: its text before the first colon ("request failed", ...)."""
    return reason.split(":", 1)[0]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def slug(name: str, empty: str = "field") -> str:
    """A name as a file or folder name: runs of other characters become one dash."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or empty
