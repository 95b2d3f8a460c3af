"""Prefect tasks of pairwise evaluation and of agreement between judges: plan (validate, resume check), judge
both orders, publish; kappa between the judges of one evaluation.

NO_CACHE, as the evaluate stage's tasks: the stage manifest decides what is redone and the judge's cache on disk
keeps every verdict once.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from eval.agreement import AGREEMENT_NAME, agreement_stage, table_rows, write_agreement
from eval.agreement import REPORT_NAME as AGREEMENT_REPORT
from eval.judge import JudgeConfig
from eval.pairwise import (
    SUMMARY_NAME,
    load_pair,
    pairwise_stage,
    report_markdown,
    result_line,
    run_pairwise,
    skipped_summary,
    summary_row,
)
from gptflow.stage import Built, Decision
from gptflow.storage import read_json
from tasks.artifacts import artifact_key, publish_markdown, publish_table
from tasks.evaluate import stage_plan


def sides(path_a: str, path_b: str, keys: tuple[str, str]) -> dict[str, str]:
    """How the report names A and B: the file, and the response field when it is not the default or the same
    file is on both sides."""
    with_key = path_a == path_b or keys[0] != keys[1]
    return {
        side: f"{path}:{key}" if with_key else path
        for side, path, key in (("a", path_a, keys[0]), ("b", path_b, keys[1]))
    }


@task(name="plan-pairwise-evaluation", cache_policy=NO_CACHE)
def plan_pairwise(
    path_a: str, path_b: str, keys: tuple[str, str], judge: JudgeConfig, out_dir: str | None, force: bool = False
) -> dict:
    """Match the two files' entries (a mismatch: one line); let the stage contract pick the folder and say whether
    this judge already compared them."""
    pairs = load_pair(path_a, path_b, *keys)
    plan = stage_plan(pairwise_stage(path_a, path_b, keys, judge, out_dir, force), out_dir is not None, force)
    get_run_logger().info(
        "%d pairs of %s and %s for judge %s; outputs in %s%s",
        len(pairs),
        path_a,
        path_b,
        judge.model,
        plan["out_dir"],
        " (already judged: reusing it)" if plan["summary"] else "",
    )
    return plan


@task(name="judge-pairs", cache_policy=NO_CACHE)
def judge_pairwise(
    path_a: str, path_b: str, keys: tuple[str, str], judge: JudgeConfig, plan: dict, judge_info: dict
) -> dict:
    """Both orders of every pair through the judge; the report in the stage folder."""
    logger = get_run_logger()
    chosen = plan["out_dir"] if plan["chosen"] else None
    summary, _ = run_pairwise(
        path_a, path_b, keys, judge, sides(path_a, path_b, keys), judge_info, chosen, plan["force"]
    )
    if failed := summary["unjudged_reasons"].get("request failed", 0):
        logger.warning("%d pairs lack a verdict after failed requests; rerun to retry them", failed)
    logger.info("%s", result_line(summary))
    return summary


@task(name="record-skipped-pairwise-evaluation", cache_policy=NO_CACHE)
def record_skipped_pairwise(plan: dict, reason: str, path_a: str, path_b: str, keys: tuple[str, str]) -> dict:
    get_run_logger().warning("pairwise evaluation skipped: %s", reason)
    return skipped_summary(plan["out_dir"], reason, sides(path_a, path_b, keys))


@task(name="publish-pairwise-evaluation", cache_policy=NO_CACHE)
def publish_pairwise(summary: dict, out_dir: str, suffix: str = "") -> None:
    """The result row and the per-instruction table as artifacts; the report as markdown."""
    key = artifact_key("pairwise", suffix)
    if summary["status"] == "skipped":
        publish_markdown(report_markdown(summary), f"{key}-report", "Pairwise evaluation: skipped")
        return
    publish_table([summary_row(summary)], key, f"{summary['a']} vs {summary['b']}: pairwise win rate of A")
    publish_table(summary["rows"], f"{key}-pairs", "Pairwise verdicts per instruction (A first, B first)")
    publish_markdown(report_markdown(summary), f"{key}-report", f"Pairwise evaluation report ({out_dir})")


@task(name="judge-agreement", cache_policy=NO_CACHE)
def judge_agreement(out_dirs: list[str], label: str, out_dir: str | None = None) -> dict:
    """Cohen's kappa between each pair of judges of one evaluation (their stage folders); a table artifact."""
    files = [Path(d) / SUMMARY_NAME for d in out_dirs]
    stage = agreement_stage(files, label, out_dir)

    def build(decision: Decision) -> Built:
        result = write_agreement(files, stage.dir)
        return Built([AGREEMENT_NAME, AGREEMENT_REPORT], {"pairs": len(result["pairs"])})

    stage.run(build)
    result = read_json(stage.dir / AGREEMENT_NAME)
    for row in table_rows(result):
        get_run_logger().info(
            "agreement of %s on %s: kappa %s over %s items", *map(row.get, ("judges", "compared", "kappa", "items"))
        )
    publish_table(table_rows(result), "judge-agreement", f"Agreement between judges ({result['kind']})")
    return {**result, "out_dir": str(stage.dir)}
