"""How far several judges agree on the same items: Cohen's kappa between each pair of judges.

Pairwise verdicts (win, tie, loss of A) are compared with plain kappa; single-answer scores 0-100 with quadratic
weights, so that 80 against 85 counts as near agreement and 10 against 90 as far. Items that either judge left
without a verdict or score are left out and counted. Kappa corrects the raw agreement rate for what two judges
would agree on by chance given how often each gives each answer: 0 is chance, 1 is perfect.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

from eval.stats import cohen_kappa
from gptflow.markdown import markdown_table
from gptflow.stage import Stage
from gptflow.storage import read_json, write_json_atomic, write_text_atomic

AGREEMENT_NAME = "agreement.json"
REPORT_NAME = "report.md"


def pairwise_agreement(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kappa on A's outcome (win, tie, loss) between each pair of judges' pairwise summaries."""
    return [
        _pair(first, second, "outcome", [r["outcome"] for r in first["rows"]], [r["outcome"] for r in second["rows"]])
        for first, second in combinations(summaries, 2)
    ]


def score_agreement(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Quadratic-weighted kappa on the scores of each response field between each pair of judges' summaries."""
    rows = []
    for first, second in combinations(summaries, 2):
        for key, field in first["fields"].items():
            rows.append(_pair(first, second, key, field["scores"], second["fields"][key]["scores"], "quadratic"))
    return rows


def _pair(first: dict, second: dict, what: str, a: list, b: list, weights: str | None = None) -> dict[str, Any]:
    if len(a) != len(b):
        raise ValueError(f"the judges' summaries cover {len(a)} and {len(b)} items: not the same evaluation")
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    kappa = cohen_kappa([x for x, _ in both], [y for _, y in both], weights)
    return {
        "judges": [first["judge"]["model"], second["judge"]["model"]],
        "compared": what,
        "n": len(both),
        "n_excluded": len(a) - len(both),
        "agreement": sum(x == y for x, y in both) / len(both) if both else None,
        "kappa": kappa,
        "weights": weights or "none",
    }


def agreement_stage(
    summary_files: Sequence[str | Path], label: str, out_dir: str | Path | None = None, force: bool = False
) -> Stage:
    """The agreement of several judges' evaluations: keyed on their summary files."""
    return Stage.declare(
        "judge-agreement",
        inputs={f"judge-{i}": Path(f) for i, f in enumerate(summary_files)},
        code=__name__,
        label=label,
        config={},
        out_dir=out_dir,
        force=force,
    )


def write_agreement(summary_files: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Kappa between each pair of the judges whose summaries these are (all pairwise or all single-answer);
    agreement.json and report.md in `out_dir`."""
    summaries = [read_json(Path(f)) for f in summary_files]
    pairwise = "rows" in summaries[0]
    rows = pairwise_agreement(summaries) if pairwise else score_agreement(summaries)
    result = {"kind": "pairwise" if pairwise else "scores", "judges": [s["judge"]["model"] for s in summaries]}
    result["pairs"] = rows
    write_json_atomic(Path(out_dir) / AGREEMENT_NAME, result)
    write_text_atomic(Path(out_dir) / REPORT_NAME, report_markdown(result))
    return result


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "judges": " vs ".join(r["judges"]),
            "compared": r["compared"],
            "items": r["n"],
            "excluded": r["n_excluded"],
            "agreement": "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%",
            "kappa": "-" if r["kappa"] is None else f"{r['kappa']:.3f}",
            "weights": r["weights"],
        }
        for r in result["pairs"]
    ]


def report_markdown(result: dict[str, Any]) -> str:
    lines = ["# Agreement between judges", "", f"Judges: {', '.join(f'`{j}`' for j in result['judges'])}.", ""]
    lines += markdown_table(table_rows(result))
    lines += ["", "Kappa: 0 is chance agreement, 1 perfect; undefined (-) when every verdict was the same.", ""]
    return "\n".join(lines)
