"""The evaluate flows: an Ollama judge scores instruction responses 0-100 (`evaluate`), or compares two models'
responses to the same instructions in both orders (`evaluate-pairwise`); with several judges, each judge's result
and Cohen's kappa between them.

If a judge is unreachable its part ends as skipped, with the reason in the logs and the report, unless
`require_judge` makes that a failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

from prefect import flow
from pydantic import BaseModel

from eval.judge import JudgeConfig, JudgeUnavailable
from eval.report import DEFAULT_RESPONSE_KEY, slug
from flows.limits import time_limit
from tasks.alerts import ALERT_HOOKS
from tasks.evaluate import judge_responses, plan_evaluation, preflight_judge, publish_evaluation, record_skipped
from tasks.pairwise import (
    judge_agreement,
    judge_pairwise,
    plan_pairwise,
    publish_pairwise,
    record_skipped_pairwise,
)


class JudgeResult(BaseModel):
    status: Literal["completed", "skipped"]
    reason: str | None = None
    out_dir: str
    summary: dict
    reused: bool = False  # this judge's stage was done before: nothing asked


class EvaluationOutcome(JudgeResult):
    """The first judge's result (the only one's, usually); with several judges, every judge's (`panel`) and the
    kappa between each pair of them (`agreement`, when at least two completed)."""

    panel: list[JudgeResult] = []
    agreement: dict | None = None


@flow(name="evaluate", log_prints=True, **ALERT_HOOKS)
def evaluate_responses_flow(
    path: str,
    response_keys: list[str] | None = None,
    judge: JudgeConfig | None = None,
    require_judge: bool = False,
    out_dir: str | None = None,
    timeout_minutes: float | None = None,
    force: bool = False,
    judge_models: list[str] | None = None,
) -> EvaluationOutcome:
    """`judge_models`: several judges, the judge config with each of these models. `timeout_minutes`: fail the run
    (TimedOut) past this time. `force`: `out_dir` may hold files gptflow did not write."""
    keys = response_keys or [DEFAULT_RESPONSE_KEY]
    judges = (judge or JudgeConfig()).panel(judge_models)
    with time_limit(timeout_minutes, "the evaluation run"):
        return _panel(
            judges,
            out_dir,
            force,
            lambda one, folder, suffix: _score(path, keys, one, require_judge, folder, force, suffix),
        )


@flow(name="evaluate-pairwise", log_prints=True, **ALERT_HOOKS)
def compare_responses_flow(
    path_a: str,
    path_b: str,
    response_keys: list[str] | None = None,
    judge: JudgeConfig | None = None,
    require_judge: bool = False,
    out_dir: str | None = None,
    timeout_minutes: float | None = None,
    force: bool = False,
    judge_models: list[str] | None = None,
) -> EvaluationOutcome:
    """A's responses against B's, judged in both orders. `response_keys`: the response field of both files (one)
    or of A and of B (two); default model_response. The other parameters as for `evaluate`."""
    keys = list(response_keys or [DEFAULT_RESPONSE_KEY])
    keys = keys * 2 if len(keys) == 1 else keys
    if len(keys) != 2:
        raise ValueError(f"response_keys: one field for both files or one for each, got {len(keys)}")
    judges = (judge or JudgeConfig()).panel(judge_models)
    with time_limit(timeout_minutes, "the pairwise evaluation run"):
        return _panel(
            judges,
            out_dir,
            force,
            lambda one, folder, suffix: _compare(
                path_a, path_b, tuple(keys), one, require_judge, folder, force, suffix
            ),
        )


def _panel(
    judges: list[JudgeConfig],
    out_dir: str | None,
    force: bool,
    run_one: Callable[[JudgeConfig, str | None, str], JudgeResult],
) -> EvaluationOutcome:
    """Each judge in turn (in `out_dir/<judge>` when several share a chosen folder), then their agreement."""
    several = len(judges) > 1
    results = []
    for one in judges:
        folder = str(Path(out_dir) / slug(one.model, "judge")) if out_dir and several else out_dir
        results.append(run_one(one, folder, one.model if several else ""))
    agreement = None
    completed = [r.out_dir for r in results if r.status == "completed"]
    if len(completed) > 1:
        label = Path(completed[0]).name
        agreement = judge_agreement(completed, label, str(Path(out_dir) / "agreement") if out_dir else None)
    return EvaluationOutcome(**results[0].model_dump(), panel=results if several else [], agreement=agreement)


def _score(
    path: str, keys: list[str], judge: JudgeConfig, require_judge: bool, out_dir: str | None, force: bool, suffix: str
) -> JudgeResult:
    plan = plan_evaluation(path, keys, judge, out_dir, force)
    summary = plan["summary"]
    if summary is None:
        status = _available(judge, require_judge)
        if status["available"]:
            summary = judge_responses(path, keys, judge, plan, status)
        else:
            summary = record_skipped(plan, status["reason"], path, keys)
    publish_evaluation(summary, plan["out_dir"], suffix)
    return _result(plan, summary)


def _compare(
    path_a: str,
    path_b: str,
    keys: tuple[str, str],
    judge: JudgeConfig,
    require_judge: bool,
    out_dir: str | None,
    force: bool,
    suffix: str,
) -> JudgeResult:
    plan = plan_pairwise(path_a, path_b, keys, judge, out_dir, force)
    summary = plan["summary"]
    if summary is None:
        status = _available(judge, require_judge)
        if status["available"]:
            summary = judge_pairwise(path_a, path_b, keys, judge, plan, status)
        else:
            summary = record_skipped_pairwise(plan, status["reason"], path_a, path_b, keys)
    publish_pairwise(summary, plan["out_dir"], suffix)
    return _result(plan, summary)


def _result(plan: dict, summary: dict) -> JudgeResult:
    reused = plan["summary"] is not None
    return JudgeResult(
        status=summary["status"], reason=summary.get("reason"), out_dir=plan["out_dir"], summary=summary, reused=reused
    )


def _available(judge: JudgeConfig, require_judge: bool) -> dict:
    status = preflight_judge(judge)
    if not status["available"] and require_judge:
        raise JudgeUnavailable(status["reason"])
    return status
