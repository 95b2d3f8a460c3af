"""Prefect tasks of the promotion stage: this run's bundle challenges its task's champion in the registry, and a
new language-model champion goes to Ollama.

Both are scored on the current data version (eval.champion), the rule decides, a promotion is atomic
(gptflow.registry), the UI gets the challenger-vs-champion table, and a promotion or a clearly worse challenger
sends an alert.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from eval.champion import (
    PAIRWISE,
    ChampionError,
    PairwiseChallenge,
    PromotionRule,
    Verdict,
    bundle_responses,
    comparison_rows,
    data_key,
    decide,
    decide_pairwise,
)
from eval.champion import score_classifier_bundle as score_classifier
from eval.judge import JudgeUnavailable, OllamaJudge
from eval.pairwise import result_line, run_pairwise, summary_row
from eval.report import DEFAULT_RESPONSE_KEY
from gptflow.errors import GptflowError
from gptflow.ollama_publish import publish_bundle
from gptflow.registry import Registry, bundle_sha256
from model.lm_quality import bundle_perplexity
from tasks.alerts import RunRef, notify
from tasks.artifacts import publish_table

Kind = Literal["classifier", "lm"]


def registry_task(kind: Kind, source: str) -> str:
    """The registry a pipeline's bundle competes in: its kind and the name of its data source
    (`classifier-spam`, `classifier-<csv file stem>`, `lm-instructions`, `lm-<json file stem>`); stable across
    the data's versions."""
    name = {"spam": "spam", "sms-spam": "spam", "instruction-data": "instructions"}.get(source)
    name = name or Path(source.split("?")[0]).stem.lower() or "data"
    return f"{kind}-{re.sub(r'[^a-z0-9._-]+', '-', name).strip('-.') or 'data'}"


def _split_file(kind: Kind, data_dir: Path) -> Path:
    name = "test.csv" if kind == "classifier" else "validation.json"
    return data_dir / name if (data_dir / name).is_file() else data_dir / "val.bin"


def _score(kind: Kind, bundle: str | Path, data_dir: str | Path) -> dict[str, Any]:
    return score_classifier(bundle, data_dir) if kind == "classifier" else bundle_perplexity(bundle, data_dir)


@task(name="challenge-champion", cache_policy=NO_CACHE)
def challenge_champion(
    kind: Kind,
    name: str,
    bundle: str,
    data_dir: str,
    rule: PromotionRule,
    judge_summary: dict[str, Any] | None = None,
    pairwise: PairwiseChallenge | None = None,
) -> dict[str, Any]:
    """Score this run's `bundle` and the champion of registry `name` on `data_dir`; promote by `rule`.
    `judge_summary`: this run's evaluation of the LM's responses; when the judge ran, its mean score is the
    challenger's `judge_score`. `pairwise`: decide a language model by judging its responses against the
    champion's when the judge answers (`rule` otherwise, and the reason says so)."""
    logger, run = get_run_logger(), flow_run.get_name() or "local"
    registry = Registry(name)
    key = data_key(_split_file(kind, Path(data_dir)))
    digest = bundle_sha256(Path(bundle))
    challenger = {**_score(kind, bundle, data_dir), **_judge_score(judge_summary)}
    champion = registry.champion()
    champion_scores, value, compared = None, challenger.get(rule.metric), None
    if champion is None:
        verdict = decide(challenger, None, rule)
    elif champion["bundle_sha256"] == digest:
        champion_scores = challenger
        same = f"the challenger is the champion {champion['version']} (same bundle)"
        verdict = Verdict("keep", same, rule.metric, value, value, 0.0, False)
    else:
        try:
            champion_scores = _champion_scores(kind, registry, champion, key, data_dir)
            verdict = decide(challenger, champion_scores, rule)
            if pairwise is not None:
                verdict, compared = _pairwise_verdict(bundle, champion, pairwise, verdict)
        except ChampionError as exc:
            logger.warning("champion %s cannot be scored on this data: %s", champion["version"], exc)
            verdict = Verdict(
                "promote", f"the champion cannot be scored on this data: {exc}", rule.metric, value, None, None, False
            )
    logger.info("%s: %s (%s)", name, verdict.decision, verdict.reason)

    promoted = None
    if verdict.decision == "promote":
        decided_by = pairwise.rule if compared is not None else rule
        record = {"kind": kind, "scores": {key: challenger}, "data_dir": data_dir, "rule": decided_by.model_dump()}
        promoted = registry.promote(
            bundle, record, reason=verdict.reason, run=run, on_step=lambda step: logger.info("promotion %s", step)
        )
        logger.info("%s: %s is the champion: %s", name, promoted["version"], registry.link)
        notify(
            "promoted",
            run=RunRef.current(),
            stage=f"promote {name}",
            reason=verdict.reason,
            details=_details(promoted, verdict),
        )
    elif verdict.alert:
        notify(
            "challenger-worse",
            run=RunRef.current(),
            stage=f"promote {name}",
            reason=verdict.reason,
            details={"champion": champion["version"], "challenger bundle": bundle, "rule": rule.model_dump_json()},
        )
    shown = (challenger, champion_scores)
    if compared is not None:  # the pair's win rates: in the table, not in the bundles' kept scores
        shown = ({**challenger, PAIRWISE: verdict.challenger}, {**champion_scores, PAIRWISE: verdict.champion})
    publish_table(
        comparison_rows(*shown, verdict),
        f"{name}-challenger-vs-champion",
        f"{name}: this run's bundle vs the champion"
        + (f" {champion['version']}" if champion else "")
        + f" on data {key[:12]}",
    )
    if compared is not None:
        publish_table(
            [summary_row(compared)], f"{name}-pairwise", f"{name}: this run's model (A) vs the champion (B), judged"
        )
    after = promoted or champion
    return {
        "status": "promoted" if promoted else "kept",
        "registry": name,
        "verdict": verdict.to_dict(),
        "challenger": challenger,
        "champion_before": champion["version"] if champion else None,
        "champion": after["version"] if after else None,
        "champion_path": str(registry.link),
        "data_key": key,
        "metrics": {"challenger": challenger, "champion": champion_scores},
        "pairwise": None if compared is None else {"row": summary_row(compared), "line": result_line(compared)},
    }


def _judge_score(summary: dict[str, Any] | None) -> dict[str, float]:
    if not summary or summary.get("status") != "completed":
        return {}
    means = [f["mean"] for f in summary["fields"].values() if f.get("mean") is not None]
    return {"judge_score": means[0]} if means else {}


def _pairwise_verdict(
    bundle: str, champion: dict[str, Any], challenge: PairwiseChallenge, fallback: Verdict
) -> tuple[Verdict, dict[str, Any] | None]:
    """The challenger's responses against the champion bundle's, judged both ways (A: the challenger), and the
    verdict of the pairwise rule; without an answering judge, `fallback` (the metric rule's) with the reason."""
    logger = get_run_logger()
    try:
        info = OllamaJudge(challenge.judge).preflight()
    except JudgeUnavailable as exc:
        reason = f"no judge for a pairwise decision ({exc}); by {fallback.metric}: {fallback.reason}"
        logger.info("%s", reason)
        return replace(fallback, reason=reason), None
    theirs = bundle_responses(champion["path"], challenge.responses, challenge.generation)
    sides = {"a": f"this run ({Path(bundle).name})", "b": f"champion {champion['version']}"}
    keys = (DEFAULT_RESPONSE_KEY, DEFAULT_RESPONSE_KEY)
    try:
        summary, folder = run_pairwise(challenge.responses, theirs, keys, challenge.judge, sides, info)
    except JudgeUnavailable as exc:
        reason = f"the judge stopped answering ({exc}); by {fallback.metric}: {fallback.reason}"
        logger.warning("%s", reason)
        return replace(fallback, reason=reason), None
    logger.info("pairwise against champion %s: %s (report %s)", champion["version"], result_line(summary), folder)
    return decide_pairwise(summary, challenge.rule), summary


def _champion_scores(kind: Kind, registry: Registry, champion: dict, key: str, data_dir: str) -> dict[str, Any]:
    """The champion's scores on data version `key`: kept from before, else measured now and kept."""
    scores = champion.get("scores", {}).get(key)
    if scores is None:
        scores = _score(kind, champion["path"], data_dir)
        registry.add_score(champion["version"], key, scores)
        get_run_logger().info("champion %s scored on data version %s", champion["version"], key[:12])
    return scores


def _details(record: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    return {
        "version": record["version"],
        "bundle sha256": record["bundle_sha256"],
        "champion path": record["path"],
        verdict.metric: verdict.challenger,
    }


@task(name="publish-champion", cache_policy=NO_CACHE)
def publish_champion(outcome: dict[str, Any], gguf_bundle: str, ollama_model: str | None) -> dict[str, Any]:
    """A promoted language model's GGUF bundle into the Ollama server (OLLAMA_HOST) as `ollama_model`; otherwise one
    line says why not (the champion was kept, no name is configured, or the server failed: the run goes on, the
    registry already holds the champion)."""
    logger = get_run_logger()
    if outcome["status"] != "promoted":
        reason = f"the champion {outcome['champion']} was kept"
    elif ollama_model is None:
        reason = "no Ollama model name is configured (promotion.ollama_model)"
    else:
        try:
            report = publish_bundle(ollama_model, gguf_bundle)
        except GptflowError as exc:
            logger.warning("champion %s not published to Ollama: %s", outcome["champion"], exc)
            return {"published": False, "reason": str(exc)}
        logger.info(
            "champion %s published to Ollama at %s as %s (%s)",
            outcome["champion"],
            report["host"],
            ollama_model,
            "uploaded" if report["uploaded"] else "its GGUF was already there",
        )
        return {"published": True, "model": ollama_model, "host": report["host"], "digest": report["digest"]}
    logger.info("not published to Ollama: %s", reason)
    return {"published": False, "reason": reason}
