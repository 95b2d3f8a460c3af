"""The evaluate stage: an Ollama judge scores instruction responses 0-100 and the report is published.

If the judge is unreachable the stage ends as skipped, with the reason in the logs and the report,
unless `require_judge` makes that a failure.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel

from eval.judge import JudgeConfig, JudgeUnavailable
from eval.report import DEFAULT_RESPONSE_KEY
from flows.limits import time_limit
from tasks.alerts import ALERT_HOOKS
from tasks.evaluate import judge_responses, plan_evaluation, preflight_judge, publish_evaluation, record_skipped


class EvaluationOutcome(BaseModel):
    status: Literal["completed", "skipped"]
    reason: str | None = None
    out_dir: str
    summary: dict


@flow(name="evaluate", log_prints=True, **ALERT_HOOKS)
def evaluate_responses_flow(
    path: str,
    response_keys: list[str] | None = None,
    judge: JudgeConfig | None = None,
    require_judge: bool = False,
    out_dir: str | None = None,
    timeout_minutes: float | None = None,
    force: bool = False,
) -> EvaluationOutcome:
    """`timeout_minutes`: fail the run (TimedOut) past this time. `force`: `out_dir` may hold files gptflow did not
    write."""
    with time_limit(timeout_minutes, "the evaluation run"):
        return _evaluate(path, response_keys, judge, require_judge, out_dir, force)


def _evaluate(
    path: str,
    response_keys: list[str] | None,
    judge: JudgeConfig | None,
    require_judge: bool,
    out_dir: str | None,
    force: bool = False,
) -> EvaluationOutcome:
    keys = response_keys or [DEFAULT_RESPONSE_KEY]
    judge = judge or JudgeConfig()
    plan = plan_evaluation(path, keys, judge, out_dir, force)
    summary = plan["summary"]
    if summary is None:
        status = preflight_judge(judge)
        if not status["available"] and require_judge:
            raise JudgeUnavailable(status["reason"])
        if status["available"]:
            summary = judge_responses(path, keys, judge, plan, status)
        else:
            summary = record_skipped(plan, status["reason"], path, keys)
    publish_evaluation(summary, plan["out_dir"])
    return EvaluationOutcome(
        status=summary["status"], reason=summary.get("reason"), out_dir=plan["out_dir"], summary=summary
    )
