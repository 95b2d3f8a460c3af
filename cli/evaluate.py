"""`gptflow evaluate RESPONSES.json [--response-key K ...]`: score responses with an Ollama judge."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import VerbConfig, add_force_option, stage_config, table

NOTHING_JUDGED = 3  # exit status: the report says why no response has a score (a script must not take it for a pass)


def register(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "evaluate",
        help="score instruction responses 0-100 with an Ollama judge and write a report",
        description="Score a JSON list of entries (instruction, input, output and response fields) with an "
        "LLM judge served by Ollama (host from OLLAMA_HOST). Judgements are cached: a rerun asks nothing new.",
        epilog=f"Exit status: 0 when responses were scored; {NOTHING_JUDGED} when nothing could be judged (no Ollama "
        "server, the judge model missing, or no reply held a usable score), with the report saying why; 2 on bad "
        "input, with --require-judge when the judge is unavailable, or when it stops answering mid-run (the "
        "judgements made so far are cached for the next run).",
    )
    parser.add_argument("responses", metavar="RESPONSES.json", help="JSON list of entries to score")
    parser.add_argument(
        "--response-key",
        action="append",
        dest="response_keys",
        metavar="K",
        help="response field to score; repeat for two fields to compare them (default: model_response)",
    )
    parser.add_argument(
        "--require-judge", action="store_true", help="fail (exit 2) instead of skipping when the judge is unreachable"
    )
    parser.add_argument("--out-dir", metavar="DIR", help="report folder (default: GPTFLOW_HOME/evaluate/<file>-<hash>)")
    add_force_option(parser, "--out-dir")
    parser.set_defaults(handler=run, stage=VerbConfig("eval.judge:JudgeConfig"), precheck=_check_responses)


def _check_responses(args: argparse.Namespace) -> None:
    """RESPONSES.json is a file, in the words of `eval.report.load_responses`, which reads and checks its entries
    once the judge's modules (matplotlib, ollama: some 2 s) are imported."""
    from data.common import DataError, require_file

    require_file(Path(args.responses), DataError, "a JSON list of entries")


def run(args: argparse.Namespace) -> int:
    from eval.judge import OllamaJudge
    from eval.report import DEFAULT_RESPONSE_KEY, REPORT_NAME, load_responses, paired_line, summary_rows

    keys = args.response_keys or [DEFAULT_RESPONSE_KEY]
    load_responses(args.responses, keys)  # bad input fails here, in one line, before any flow starts
    judge = stage_config(args)
    if args.require_judge:
        OllamaJudge(judge).preflight()  # raises JudgeUnavailable with what to do

    from flows.evaluate import evaluate_responses_flow

    outcome = evaluate_responses_flow(
        args.responses, keys, judge, require_judge=args.require_judge, out_dir=args.out_dir, force=args.force
    )
    if outcome.status == "skipped":
        print(f"evaluation skipped: {outcome.reason}", file=sys.stderr)
        print(f"report: {outcome.out_dir}/{REPORT_NAME}")
        return NOTHING_JUDGED
    print(table(summary_rows(outcome.summary)))
    if outcome.summary["paired"]:
        print(paired_line(outcome.summary["paired"]))
    print(f"report: {outcome.out_dir}/{REPORT_NAME}")
    if not any(f["n_scored"] for f in outcome.summary["fields"].values()):
        print("nothing judged: no reply held a usable score (the report lists each reason)", file=sys.stderr)
        return NOTHING_JUDGED
    return 0
