"""Which of two models answers better: pairwise judging in both orders (MT-Bench) with AlpacaEval 2's statistics.

For each instruction the judge sees the reference answer and the two responses, once as (A, B) and once as
(B, A), and answers with a JSON verdict under a schema at temperature 0. Agreeing verdicts are a win or a loss
(or a tie when both say tie); disagreeing ones are a tie and count toward the position-bias rate, since a judge
that changes its mind when the order changes was swayed by the order. The report: wins, ties and losses; the win
rate of A (ties as half) with a seeded bootstrap 95% interval and its standard error; the length-controlled win
rate (`eval.stats.length_controlled_win_rate`); the position-bias rate; the mean length of each side; a row per
instruction with both verdicts.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from eval.judge import JudgeConfig, OllamaJudge, Rubric, clip, json_field
from eval.report import ResponsesFileError, load_responses
from eval.stats import bootstrap_ci, length_controlled_win_rate, standard_error
from gptflow.markdown import markdown_table
from gptflow.prompts import format_instruction
from gptflow.stage import Built, Stage
from gptflow.storage import read_json, write_json_atomic, write_text_atomic

SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.md"
PAIRS_NAME = "pairs.csv"

PAIRWISE_PROMPT = (
    "Please act as an impartial judge and compare two responses to the instruction below, using the reference "
    "answer. Judge correctness and helpfulness; do not let the order of the responses or their length influence "
    "you.\n\n"
    "[Instruction]\n{prompt}\n\n"
    "[Reference answer]\n{output}\n\n"
    "[Response A]\n{first}\n[End of response A]\n\n"
    "[Response B]\n{second}\n[End of response B]\n\n"
    'Reply with JSON: {{"explanation": one sentence, "verdict": "A" if response A is better, "B" if response B is '
    'better, "tie" if they are equally good}}. Without JSON, end your reply with [[A]], [[B]] or [[C]] for a tie.'
)
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"explanation": {"type": "string"}, "verdict": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["explanation", "verdict"],
}
VERDICTS = ("A", "B", "tie")
_BRACKETED = re.compile(r"\[\[(A|B|C)\]\]")
_BARE = {"a": "A", "b": "B", "tie": "tie", "c": "tie"}
OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def pairwise_prompt(entry: dict[str, str], first: str, second: str) -> str:
    """The judge's prompt: the instruction as the book's judge shows it, the reference, then the two responses."""
    return PAIRWISE_PROMPT.format(prompt=format_instruction(entry), output=entry["output"], first=first, second=second)


def parse_verdict(reply: str) -> tuple[str | None, str | None]:
    """("A" | "B" | "tie", None) or (None, why): JSON `{"verdict": ...}` first, else MT-Bench's [[A]] / [[B]] /
    [[C]] (the last one in the text), else a reply that is only the verdict."""
    text = reply.strip()
    found, verdict = json_field(text, "verdict")
    if found:
        if verdict in VERDICTS:
            return verdict, None
        return None, f"verdict not A, B or tie: {verdict!r}"
    if found := _BRACKETED.findall(text):
        return ("tie" if found[-1] == "C" else found[-1]), None
    if bare := _BARE.get(text.strip(" .*\"'").lower()):
        return bare, None
    return None, f"no verdict in reply: {clip(text)!r}"


VERDICT = Rubric("verdict", VERDICT_SCHEMA, parse_verdict)


# --- the two files -----------------------------------------------------------------------------------------


def load_pair(path_a: str | Path, path_b: str | Path, key_a: str, key_b: str) -> list[dict[str, Any]]:
    """The entries of two responses files matched by instruction and input (the k-th repeat with the k-th), each
    with A's response as `a` and B's as `b`; a file that misses or adds an instruction, or gives it another
    reference answer, is one line naming the entry."""
    a_entries, b_entries = load_responses(path_a, [key_a]), load_responses(path_b, [key_b])
    by_key: dict[tuple[str, str], list[int]] = {}
    for index, entry in enumerate(b_entries):
        by_key.setdefault(_match_key(entry), []).append(index)
    pairs, used = [], set()
    for index, entry in enumerate(a_entries):
        matches = by_key.get(_match_key(entry)) or []
        if not matches:
            raise ResponsesFileError(
                f"{path_b}: no entry for instruction {clip(entry['instruction'])!r} (input "
                f"{clip(entry.get('input') or '')!r}) of {path_a} entry {index}: both files must answer the same "
                "instructions"
            )
        j = matches.pop(0)
        used.add(j)
        if b_entries[j]["output"] != entry["output"]:
            raise ResponsesFileError(
                f"{path_b} entry {j}: its reference output differs from {path_a} entry {index} for instruction "
                f"{clip(entry['instruction'])!r}: the files answer different test sets"
            )
        pairs.append({**{k: entry.get(k, "") for k in ("instruction", "input", "output")}, "a": entry[key_a]})
        pairs[-1]["b"] = b_entries[j][key_b]
    if extra := sorted(set(range(len(b_entries))) - used):
        raise ResponsesFileError(
            f"{path_b} entry {extra[0]}: instruction {clip(b_entries[extra[0]]['instruction'])!r} is not in "
            f"{path_a}: both files must answer the same instructions"
        )
    return pairs


def _match_key(entry: dict[str, str]) -> tuple[str, str]:
    return entry["instruction"], entry.get("input") or ""


# --- judging -----------------------------------------------------------------------------------------------


def judge_pairs(pairs: Sequence[dict[str, Any]], judge: OllamaJudge) -> list[dict[str, Any]]:
    """Both orders of every pair through the judge; a row per pair with the verdicts in the files' terms (A is
    the first file's response, whichever position it was shown in) and A's outcome (None: not judged, with why)."""
    prompts = [pairwise_prompt(p, p["a"], p["b"]) for p in pairs] + [pairwise_prompt(p, p["b"], p["a"]) for p in pairs]
    judgements = judge.ask_many(prompts)
    n, rows = len(pairs), []
    for index, pair in enumerate(pairs):
        ab, ba = judgements[index], judgements[n + index]
        verdict_ab = ab.value
        verdict_ba = {"A": "B", "B": "A", "tie": "tie"}.get(ba.value)  # B was shown first: swap back
        reasons = [f"{order}: {j.reason}" for order, j in (("A first", ab), ("B first", ba)) if j.value is None]
        if reasons:
            outcome, consistent = None, None
        else:
            consistent = verdict_ab == verdict_ba
            outcome = {"A": "win", "B": "loss", "tie": "tie"}[verdict_ab] if consistent else "tie"
        rows.append(
            {
                "index": index,
                "instruction": pair["instruction"],
                "input": pair["input"],
                "output": pair["output"],
                "a": pair["a"],
                "b": pair["b"],
                "length_a": len(pair["a"]),
                "length_b": len(pair["b"]),
                "verdict_ab": verdict_ab,
                "verdict_ba": verdict_ba,
                "outcome": outcome,
                "consistent": consistent,
                "reason": "; ".join(reasons) or None,
                "from_cache": ab.cached and ba.cached,
                "reply_ab": ab.reply,
                "reply_ba": ba.reply,
            }
        )
    return rows


def pairwise_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts, win rate of A with its bootstrap 95% interval and standard error, the length-controlled win rate,
    the position-bias rate (verdicts that flipped with the order, of the judged pairs) and mean lengths."""
    judged = [r for r in rows if r["outcome"] is not None]
    values = [OUTCOME_VALUE[r["outcome"]] for r in judged]
    counts = Counter(r["outcome"] for r in judged)
    flipped = sum(not r["consistent"] for r in judged)
    unjudged = [{"index": r["index"], "reason": r["reason"]} for r in rows if r["outcome"] is None]
    n = len(judged)
    return {
        "n_pairs": len(rows),
        "n_judged": n,
        "n_unjudged": len(unjudged),
        "wins": counts["win"],
        "ties": counts["tie"],
        "losses": counts["loss"],
        "win_rate": sum(values) / n if n else None,
        "ci95": bootstrap_ci(values),
        "standard_error": standard_error(values),
        "length_controlled_win_rate": length_controlled_win_rate(
            values, [r["length_a"] for r in judged], [r["length_b"] for r in judged]
        ),
        "position_bias_rate": flipped / n if n else None,
        "flipped": flipped,
        "mean_length_a": _mean([r["length_a"] for r in rows]),
        "mean_length_b": _mean([r["length_b"] for r in rows]),
        "unjudged_reasons": dict(Counter(_reason_kind(u["reason"]) for u in unjudged)),
        "unjudged": unjudged,
        "from_cache": sum(r["from_cache"] for r in rows),
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _reason_kind(reason: str) -> str:
    """ "A first: request failed: ..." -> "request failed" (the first order's kind when both failed)."""
    return reason.split("; ")[0].split(": ")[1] if ": " in reason else reason


# --- the stage and its report ------------------------------------------------------------------------------


def pairwise_stage(
    path_a: str | Path,
    path_b: str | Path,
    keys: tuple[str, str],
    judge: JudgeConfig,
    out_dir: str | Path | None = None,
    force: bool = False,
) -> Stage:
    """The pairwise evaluation of two responses files by one judge: keyed on both files, the response fields and
    what decides a verdict (model, options, schema; not the host or timing)."""
    return Stage.declare(
        "evaluate-pairwise",
        inputs={"a": Path(path_a), "b": Path(path_b)},
        code=__name__,
        label=f"{Path(path_a).stem}-vs-{Path(path_b).stem}-{judge.model}",
        config={"response_keys": list(keys), "judge": judge.identity(VERDICT)},
        out_dir=out_dir,
        force=force,
    )


def run_pairwise(
    path_a: str | Path,
    path_b: str | Path,
    keys: tuple[str, str],
    judge: JudgeConfig,
    sides: dict[str, str],
    judge_info: dict | None = None,
    out_dir: str | Path | None = None,
    force: bool = False,
) -> tuple[dict[str, Any], Path]:
    """The pairwise stage of two responses files and one judge: reused when done, else judged; certified only when
    no request failed for good (the next run asks those again, every other verdict comes from the cache). Returns
    the summary and the stage folder."""
    pairs = load_pair(path_a, path_b, *keys)
    stage = pairwise_stage(path_a, path_b, keys, judge, out_dir, force)

    def build(decision) -> Built:
        summary = compare_responses(pairs, OllamaJudge(judge, rubric=VERDICT), stage.dir, sides, judge_info)
        failed = summary["unjudged_reasons"].get("request failed", 0)
        metrics = {k: summary[k] for k in ("wins", "ties", "losses", "win_rate", "position_bias_rate", "n_unjudged")}
        return Built([SUMMARY_NAME, REPORT_NAME, PAIRS_NAME], metrics, certified=not failed)

    stage.run(build)
    return read_json(stage.dir / SUMMARY_NAME), stage.dir


def compare_responses(
    pairs: Sequence[dict[str, Any]],
    judge: OllamaJudge,
    out_dir: str | Path,
    sides: dict[str, str],
    judge_info: dict | None = None,
) -> dict[str, Any]:
    """Judge every pair both ways, write summary.json, pairs.csv and report.md into out_dir; return the summary.
    `sides`: what A and B are ({"a": "run-7/test_responses.json", "b": ...}), for the report."""
    out_dir = Path(out_dir)
    rows = judge_pairs(pairs, judge)
    summary = {
        "status": "completed",
        "a": sides["a"],
        "b": sides["b"],
        "judge": {**(judge_info or {"host": judge.config.host}), **judge.identity()},
        "requests_sent": judge.requests_sent,
        **pairwise_stats(rows),
        "rows": [{k: r[k] for k in ROW_FIELDS} for r in rows],
    }
    write_text_atomic(out_dir / PAIRS_NAME, pairs_csv(rows))
    write_json_atomic(out_dir / SUMMARY_NAME, summary)
    write_text_atomic(out_dir / REPORT_NAME, report_markdown(summary))
    return read_json(out_dir / SUMMARY_NAME)


ROW_FIELDS = ("index", "instruction", "length_a", "length_b", "verdict_ab", "verdict_ba", "outcome", "reason")


def pairs_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Every pair with both responses, both verdicts, the outcome and the judge's replies."""
    buffer = io.StringIO()
    columns = [
        "index",
        "instruction",
        "input",
        "output",
        "a",
        "b",
        "length_a",
        "length_b",
        "verdict_ab",
        "verdict_ba",
        "outcome",
        "reason",
        "reply_ab",
        "reply_ba",
    ]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if r[k] is None else r[k]) for k in columns} for r in rows)
    return buffer.getvalue()


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """One judge's result as a table row (CLI, Prefect, markdown, the registry's comparison)."""
    ci, lc = summary["ci95"], summary["length_controlled_win_rate"]
    return {
        "judge": summary["judge"]["model"],
        "wins": summary["wins"],
        "ties": summary["ties"],
        "losses": summary["losses"],
        "unjudged": summary["n_unjudged"],
        "win rate": _pct(summary["win_rate"]),
        "95% CI": f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "-",
        "LC win rate": _pct(lc),
        "position bias": _pct(summary["position_bias_rate"]),
        "mean length A": _num(summary["mean_length_a"]),
        "mean length B": _num(summary["mean_length_b"]),
    }


def result_line(summary: dict[str, Any]) -> str:
    """A's result against B in one line."""
    row = summary_row(summary)
    return (
        f"{summary['a']} vs {summary['b']} ({row['judge']}): {row['wins']} wins, {row['ties']} ties, "
        f"{row['losses']} losses, win rate {row['win rate']} {row['95% CI']}, length-controlled {row['LC win rate']}, "
        f"position bias {row['position bias']}"
    )


def report_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Pairwise evaluation", ""]
    if summary["status"] == "skipped":
        return "\n".join(lines + [f"**Skipped**: {summary['reason']}", "", "No pair was judged.", ""])
    judge = summary["judge"]
    lines += [
        f"A: `{summary['a']}`; B: `{summary['b']}`.",
        "",
        f"Judge: `{judge['model']}` at {judge.get('host')} (digest `{judge.get('digest')}`), options "
        f"`{json.dumps(judge['options'])}`, structured output: {judge['format'] is not None}. Each pair was judged "
        f"as (A, B) and as (B, A); a verdict that flips with the order is a tie. {summary['n_pairs']} pairs, "
        f"{summary['requests_sent']} judge requests sent this run.",
        "",
    ]
    lines += markdown_table([summary_row(summary)]) + [""]
    lines += [
        "Win rate: A's, ties counted as half, with a seeded bootstrap 95% interval (standard error "
        f"{_num(summary['standard_error'], 4)}). LC: length-controlled (AlpacaEval 2). Lengths in characters.",
        "",
    ]
    if summary["unjudged"]:
        lines += ["Pairs without a verdict (counted, not dropped):", ""]
        lines += [f"- pair {u['index']}: {u['reason']}" for u in summary["unjudged"]] + [""]
    lines += ["## Per instruction", ""]
    lines += markdown_table([{**r, "instruction": clip(r["instruction"], 50)} for r in summary["rows"]])
    return "\n".join(lines) + "\n"


def skipped_summary(out_dir: str | Path, reason: str, sides: dict[str, str]) -> dict[str, Any]:
    """Record that no pair was judged (the judge was unavailable): nothing scored, nothing faked."""
    summary = {"status": "skipped", "reason": reason, **sides}
    write_json_atomic(Path(out_dir) / SUMMARY_NAME, summary)
    write_text_atomic(Path(out_dir) / REPORT_NAME, report_markdown(summary))
    return summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
