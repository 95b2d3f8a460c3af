"""`gptflow evaluate RESPONSES.json [--response-key K ...]`: score responses with an Ollama judge."""

from __future__ import annotations

import argparse
import sys


def register(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "evaluate", help="score instruction responses 0-100 with an Ollama judge and write a report",
        description="Score a JSON list of entries (instruction, input, output and response fields) with an "
        "LLM judge served by Ollama (host from OLLAMA_HOST). Judgements are cached: a rerun asks nothing new.",
    )
    parser.add_argument("responses", metavar="RESPONSES.json", help="JSON list of entries to score")
    parser.add_argument("--response-key", action="append", dest="response_keys", metavar="K",
                        help="response field to score; repeat for two fields to compare them "
                        "(default: model_response)")
    parser.add_argument("--judge-model", metavar="M",
                        help="Ollama judge model (default: GPTFLOW_JUDGE_MODEL or llama3)")
    parser.add_argument("--host", metavar="URL",
                        help="Ollama server URL (default: OLLAMA_HOST or http://localhost:11434)")
    parser.add_argument("--concurrency", type=int, metavar="N", help="judge requests in flight at once (default 1)")
    parser.add_argument("--timeout", type=float, dest="timeout_s", metavar="S", help="seconds per judge request")
    parser.add_argument("--pull", action="store_true", help="pull the judge model if the server lacks it")
    parser.add_argument("--require-judge", action="store_true",
                        help="fail (exit 2) instead of skipping when the judge is unreachable")
    parser.add_argument("--out-dir", metavar="DIR", help="report folder (default: GPTFLOW_HOME/evaluate/<file>-<hash>)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from eval.judge import JudgeConfig, OllamaJudge
    from eval.report import DEFAULT_RESPONSE_KEY, REPORT_NAME, load_responses, paired_line, summary_rows
    from gptflow.settings import SettingsError

    keys = args.response_keys or [DEFAULT_RESPONSE_KEY]
    load_responses(args.responses, keys)  # bad input fails here, in one line, before any flow starts
    overrides = {"model": args.judge_model, "host": args.host, "concurrency": args.concurrency,
                 "timeout_s": args.timeout_s, "pull": args.pull}
    try:
        judge = JudgeConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        option = {"model": "--judge-model", "timeout_s": "--timeout"}.get(err["loc"][0], f"--{err['loc'][0]}")
        raise SettingsError(f"{option}: {err['msg']}") from None
    if args.require_judge:
        OllamaJudge(judge).preflight()  # raises JudgeUnavailable with what to do

    from flows.evaluate import evaluate_responses_flow

    outcome = evaluate_responses_flow(args.responses, keys, judge, require_judge=args.require_judge,
                                      out_dir=args.out_dir)
    if outcome.status == "skipped":
        print(f"evaluation skipped: {outcome.reason}", file=sys.stderr)
        print(f"report: {outcome.out_dir}/{REPORT_NAME}")
        return 0
    rows = summary_rows(outcome.summary)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in rows[0]}
    print("  ".join(c.ljust(w) for c, w in widths.items()))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in widths.items()))
    if outcome.summary["paired"]:
        print(paired_line(outcome.summary["paired"]))
    print(f"report: {outcome.out_dir}/{REPORT_NAME}")
    return 0
