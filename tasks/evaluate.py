"""Prefect tasks of the evaluate stage: plan (validate, resume check), judge preflight, judging, publishing.

The tasks use NO_CACHE: what is redone is decided by the stage manifest (a finished evaluation of the same
file with the same judge is not redone) and by the judge's cache on disk (a judgement is never asked twice).
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from eval.judge import JudgeConfig, JudgeUnavailable, OllamaJudge
from eval.report import (
    REPORT_NAME,
    SCORES_NAME,
    SUMMARY_NAME,
    evaluate_responses,
    evaluation_stage,
    load_responses,
    paired_line,
    report_markdown,
    skipped_report,
    summary_rows,
)
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import read_json
from tasks.artifacts import artifact_key, publish_markdown, publish_plot, publish_table


@task(name="plan-evaluation", cache_policy=NO_CACHE)
def plan_evaluation(
    path: str, response_keys: list[str], judge: JudgeConfig, out_dir: str | None, force: bool = False
) -> dict:
    """Check the responses file; let the stage contract pick the folder (`out_dir`: the user's, which `force` lets
    hold files gptflow did not write) and say whether it is already done."""
    entries = load_responses(path, response_keys)
    plan = stage_plan(evaluation_stage(path, response_keys, judge, out_dir, force), out_dir is not None, force)
    get_run_logger().info(
        "%d entries in %s, scoring %s; outputs in %s%s",
        len(entries),
        path,
        ", ".join(response_keys),
        plan["out_dir"],
        " (already evaluated: reusing it)" if plan["summary"] else "",
    )
    return plan


def stage_plan(stage: Stage, chosen: bool, force: bool) -> dict:
    """What an evaluation's plan hands on: its folder, whether the user chose it (and `force`), and its summary
    when the stage is already done."""
    done = stage.plan().reused
    return {
        "out_dir": str(stage.dir),
        "chosen": chosen,
        "force": force,
        "summary": read_json(stage.dir / SUMMARY_NAME) if done else None,
    }


@task(name="judge-preflight", cache_policy=NO_CACHE)
def preflight_judge(judge: JudgeConfig) -> dict:
    """Ask the Ollama server whether it answers and has the judge model (pulling it if allowed)."""
    logger = get_run_logger()
    try:
        info = OllamaJudge(judge).preflight()
    except JudgeUnavailable as exc:
        logger.warning("judge unavailable: %s", exc)
        return {"available": False, "reason": str(exc)}
    logger.info("judge %s at %s is ready (digest %s)", info["model"], info["host"], info["digest"])
    return {"available": True, **info}


@task(name="judge-responses", cache_policy=NO_CACHE)
def judge_responses(path: str, response_keys: list[str], judge: JudgeConfig, plan: dict, judge_info: dict) -> dict:
    logger = get_run_logger()
    entries = load_responses(path, response_keys)
    chosen = plan["out_dir"] if plan["chosen"] else None  # else the contract names the same folder again
    stage = evaluation_stage(path, response_keys, judge, chosen, plan["force"])

    def build(decision: Decision) -> Built:
        summary = evaluate_responses(
            entries, response_keys, OllamaJudge(judge), stage.dir, source=str(path), judge_info=judge_info
        )
        fields = summary["fields"]
        failed = sum(f["unscored_reasons"].get("request failed", 0) for f in fields.values())
        if failed:  # no manifest: the next run asks again for these (every other judgement is cached)
            logger.warning("%d judge requests failed; rerun to retry them", failed)
        return Built(
            [SUMMARY_NAME, REPORT_NAME, SCORES_NAME, *(f["histogram"] for f in fields.values())],
            {
                key: {"mean": f["mean"], "n_scored": f["n_scored"], "n_unscored": f["n_unscored"]}
                for key, f in fields.items()
            },
            certified=not failed,
        )

    stage.run(build)
    summary = read_json(stage.dir / SUMMARY_NAME)
    for key, f in summary["fields"].items():
        logger.info(
            "%s: %d scored, %d unscored %s, mean %s, 95%% CI %s",
            key,
            f["n_scored"],
            f["n_unscored"],
            f["unscored_reasons"] or "",
            f["mean"],
            f["ci95"],
        )
    if summary["paired"]:
        logger.info("paired: %s", paired_line(summary["paired"]))
    return summary


@task(name="record-skipped-evaluation", cache_policy=NO_CACHE)
def record_skipped(plan: dict, reason: str, path: str, response_keys: list[str]) -> dict:
    get_run_logger().warning("evaluation skipped: %s", reason)
    return skipped_report(plan["out_dir"], reason, source=str(path), response_keys=response_keys)


@task(name="publish-evaluation", cache_policy=NO_CACHE)
def publish_evaluation(summary: dict, out_dir: str, suffix: str = "") -> None:
    """`suffix`: the judge's name in the artifact keys, when several judges score the same file."""
    report = artifact_key("evaluation-report", suffix)
    if summary["status"] == "skipped":
        publish_markdown(report_markdown(summary), report, "Judge evaluation: skipped")
        return
    publish_table(summary_rows(summary), artifact_key("evaluation-summary", suffix), "Judge scores per response field")
    publish_markdown(report_markdown(summary), report, f"Judge evaluation report ({out_dir})")
    for key, f in summary["fields"].items():
        publish_plot(
            Path(out_dir) / f["histogram"], artifact_key("evaluation-histogram", key, suffix), f"Judge scores: {key}"
        )
