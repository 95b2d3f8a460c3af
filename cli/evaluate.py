"""`gptflow evaluate RESPONSES.json | --pairwise A.json B.json [--judge M ...]`: score responses with an Ollama judge,
or compare two models' responses to the same instructions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import VerbConfig, add_force_option, stage_config, table

NOTHING_JUDGED = 3  # exit status: the report says why no response has a score (a script must not take it for a pass)


def register(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "evaluate",
        help="score instruction responses 0-100 with an Ollama judge, or compare two models' responses pairwise",
        description="Score a JSON list of entries (instruction, input, output and response fields) with an "
        "LLM judge served by Ollama (host from OLLAMA_HOST), or with --pairwise compare two such files answer by "
        "answer, each pair judged in both orders (a verdict that flips is a tie): win rate with a bootstrap 95%% "
        "interval, length-controlled win rate, position bias. Several --judge: each judge's result and Cohen's "
        "kappa between them. Judgements are cached: a rerun asks nothing new.",
        epilog=f"Exit status: 0 when responses were judged; {NOTHING_JUDGED} when nothing could be judged (no Ollama "
        "server, the judge model missing, or no reply held a usable score or verdict), with the report saying why; 2 "
        "on bad input, with --require-judge when a judge is unavailable, or when it stops answering mid-run (the "
        "judgements made so far are cached for the next run).",
    )
    parser.add_argument("responses", metavar="RESPONSES.json", nargs="?", help="JSON list of entries to score")
    parser.add_argument(
        "--pairwise",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="compare the responses of two files for the same instructions (matched by instruction and input)",
    )
    parser.add_argument(
        "--response-key",
        action="append",
        dest="response_keys",
        metavar="K",
        help="response field to score; repeat for two fields to compare them (default: model_response); with "
        "--pairwise, the field of both files, or give it twice: A's, then B's",
    )
    parser.add_argument(
        "--judge",
        action="append",
        dest="judges",
        metavar="M",
        help="judge model; repeat for several judges, each reported with Cohen's kappa between them (default: --model)",
    )
    parser.add_argument(
        "--require-judge", action="store_true", help="fail (exit 2) instead of skipping when a judge is unreachable"
    )
    parser.add_argument(
        "--out-dir",
        metavar="DIR",
        help="report folder (default: GPTFLOW_HOME/evaluate/<file>-<hash>, or evaluate-pairwise/; several judges: "
        "a folder per judge and agreement/ inside it)",
    )
    add_force_option(parser, "--out-dir")
    parser.set_defaults(handler=run, stage=VerbConfig("eval.judge:JudgeConfig"), precheck=_check_responses)


def _check_responses(args: argparse.Namespace) -> None:
    """One responses file or --pairwise's two, each a file, in the words of `eval.report.load_responses`, which
    reads and checks their entries once the judge's modules (matplotlib, ollama: some 2 s) are imported."""
    from data.common import DataError, require_file
    from gptflow.settings import ollama_model_name

    if (args.responses is None) == (args.pairwise is None):
        raise DataError("give RESPONSES.json to score, or --pairwise A.json B.json to compare (not both)")
    if args.judges and "model" in vars(args):
        raise DataError("give the judge as --model or as --judge, not both")
    for model in args.judges or []:
        try:
            ollama_model_name(model)
        except ValueError as exc:
            raise DataError(f"--judge: {exc}") from None
    if args.pairwise and len(args.response_keys or []) > 2:
        raise DataError(
            f"--response-key: with --pairwise one for both files or one for each, got {len(args.response_keys)}"
        )
    for path in args.pairwise or [args.responses]:
        require_file(Path(path), DataError, "a JSON list of entries")


def run(args: argparse.Namespace) -> int:
    judge = stage_config(args)
    if args.pairwise:
        return _compare(args, judge)
    return _score(args, judge)


def _score(args: argparse.Namespace, judge) -> int:
    from eval.report import DEFAULT_RESPONSE_KEY, REPORT_NAME, load_responses, paired_line, summary_rows

    keys = args.response_keys or [DEFAULT_RESPONSE_KEY]
    load_responses(args.responses, keys)  # bad input fails here, in one line, before any flow starts
    _preflight(args, judge)

    from flows.evaluate import evaluate_responses_flow

    outcome = evaluate_responses_flow(args.responses, keys, judge, **_flow_options(args))
    judged = False
    for result in outcome.panel or [outcome]:
        if result.status == "skipped":
            print(f"evaluation skipped: {result.reason}", file=sys.stderr)
        else:
            print(table([{"judge": result.summary["judge"]["model"], **row} for row in summary_rows(result.summary)]))
            if result.summary["paired"]:
                print(paired_line(result.summary["paired"]))
            judged = judged or any(f["n_scored"] for f in result.summary["fields"].values())
        print(f"report: {result.out_dir}/{REPORT_NAME}")
    return _finish(outcome, judged, "no reply held a usable score")


def _compare(args: argparse.Namespace, judge) -> int:
    from eval.pairwise import REPORT_NAME, load_pair, result_line, summary_row
    from eval.report import DEFAULT_RESPONSE_KEY

    keys = args.response_keys or [DEFAULT_RESPONSE_KEY]
    keys = keys * 2 if len(keys) == 1 else keys
    load_pair(*args.pairwise, *keys)  # a mismatch fails here, in one line, before any flow starts
    _preflight(args, judge)

    from flows.evaluate import compare_responses_flow

    outcome = compare_responses_flow(*args.pairwise, keys, judge, **_flow_options(args))
    results = outcome.panel or [outcome]
    completed = [r for r in results if r.status == "completed"]
    for result in results:
        if result.status == "skipped":
            print(f"pairwise evaluation skipped: {result.reason}", file=sys.stderr)
    if completed:
        print(table([summary_row(r.summary) for r in completed]))
        for result in completed:
            print(result_line(result.summary))
    for result in results:
        print(f"report: {result.out_dir}/{REPORT_NAME}")
    judged = any(r.summary["n_judged"] for r in completed)
    return _finish(outcome, judged, "no pair got a verdict in both orders")


def _flow_options(args: argparse.Namespace) -> dict:
    return {
        "require_judge": args.require_judge,
        "out_dir": args.out_dir,
        "force": args.force,
        "judge_models": args.judges,
    }


def _preflight(args: argparse.Namespace, judge) -> None:
    """With --require-judge, every judge answers before any flow starts (else JudgeUnavailable, with what to do)."""
    if args.require_judge:
        from eval.judge import OllamaJudge

        for one in judge.panel(args.judges):
            OllamaJudge(one).preflight()


def _finish(outcome, judged: bool, nothing: str) -> int:
    from eval.agreement import table_rows

    if outcome.agreement:
        print("agreement between judges:")
        print(table(table_rows(outcome.agreement)))
    if not judged:
        if any(r.status == "completed" for r in outcome.panel or [outcome]):
            print(f"nothing judged: {nothing} (the report lists each reason)", file=sys.stderr)
        return NOTHING_JUDGED
    return 0
