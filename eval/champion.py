"""Champion vs challenger: score two bundles on the same current data, and decide whether to promote.

Both bundles are scored as they ship (the int8 model when the bundle has one, through onnxruntime alone), on
the current data version: a classifier on the test split, a language model by its validation perplexity.
A score is kept per data version (the sha256 of the split file), so the champion is re-scored only when the
data changed. A language model is decided by pairwise judging when a judge answers: the champion's bundle
answers the test instructions the challenger answered, with the same settings, and the challenger is promoted
when the lower bound of its win rate's 95% interval is above 50% (plus a margin).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from edge import BundleError
from edge.lm import EdgeGenerator
from edge.runtime import ORT_FILES, EdgeClassifier
from eval.judge import JudgeConfig
from eval.metrics import classification_report
from eval.report import DEFAULT_RESPONSE_KEY
from gptflow.errors import GptflowError
from gptflow.gates import reaches
from gptflow.prompts import CHAT, clean_response
from gptflow.settings import ollama_model_name
from gptflow.splits import read_labelled, read_labels
from gptflow.stage import Built, Stage
from gptflow.storage import read_json, sha256_file, sha256_json, write_json_atomic
from gptflow.strict import StrictConfig

# The metrics each registry may be compared on, and how an error names the model.
METRICS_OF = {
    "classifier": (("accuracy", "macro_f1"), "a classifier"),
    "lm": (("val_perplexity", "judge_score"), "a language model"),
}
HIGHER_IS_BETTER = {
    "accuracy": True,
    "macro_f1": True,
    "val_perplexity": False,
    "judge_score": True,
    "pairwise_win_rate": True,
}
PAIRWISE = "pairwise_win_rate"
RESPONSES_NAME = "test_responses.json"


class ChampionError(GptflowError, ValueError):
    """A bundle or a data folder that cannot be scored."""


class PromotionRule(StrictConfig):
    """When a challenger replaces the champion, and when a worse one raises an alert."""

    metric: Literal["accuracy", "macro_f1", "val_perplexity", "judge_score"]
    margin: float = Field(default=0.0, ge=0, description="promote only when better by at least this much (and > 0)")
    alert_worse_by: float = Field(
        default=0.02, ge=0, description="alert when the challenger is worse than the champion by more than this"
    )


class PairwiseRule(StrictConfig):
    """How a language-model challenger is decided when a judge answers: judged against the champion, both orders."""

    enabled: bool = Field(default=True, description="decide by pairwise judging when the judge answers")
    margin: float = Field(
        default=0.0, ge=0, lt=0.5, description="promote when the win rate's 95% lower bound is above 0.5 + this"
    )


class PromotionConfig(StrictConfig):
    """The rule of each registry the pipeline feeds: its classifier bundle and its language-model bundle."""

    enabled: bool = Field(default=True, description="challenge the champions after the run (off: register nothing)")
    classifier: PromotionRule = PromotionRule(metric="accuracy", margin=0.0, alert_worse_by=0.02)
    lm: PromotionRule = PromotionRule(metric="val_perplexity", margin=0.0, alert_worse_by=1.0)
    pairwise: PairwiseRule = Field(
        default_factory=PairwiseRule, description="the language model's rule when a judge answers (else `lm`'s)"
    )
    ollama_model: str | None = Field(
        default=None,
        description="publish each new language-model champion's GGUF to the Ollama server (OLLAMA_HOST) under this "
        "name (None: publish nothing)",
    )

    @field_validator("ollama_model")
    @classmethod
    def _ollama_name(cls, value: str | None) -> str | None:
        return None if value is None else ollama_model_name(value)

    @field_validator("classifier", "lm")
    @classmethod
    def _metric_fits_the_model(cls, rule: PromotionRule, info) -> PromotionRule:
        allowed, what = METRICS_OF[info.field_name]
        if rule.metric not in allowed:
            raise ValueError(f"{what} is compared on {' or '.join(allowed)}, not {rule.metric!r}")
        return rule


@dataclass(frozen=True)
class Verdict:
    decision: Literal["promote", "keep"]
    reason: str
    metric: str
    challenger: float | None
    champion: float | None
    improvement: float | None  # in the metric's better direction: > 0 means the challenger is better
    alert: bool  # worse than the champion by more than the rule allows, or not a finite score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_key(split_file: Path) -> str:
    """The data version a score belongs to: the sha256 of the split it was measured on."""
    return sha256_file(split_file)


def score_classifier_bundle(bundle: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """Accuracy and macro-F1 of a classifier bundle on `data_dir`'s test split (its shipped model: int8 if any)."""
    bundle, data_dir = Path(bundle), Path(data_dir)
    if not (data_dir / "test.csv").is_file() or not (data_dir / "labels.json").is_file():
        raise ChampionError(f"{data_dir}: expected a prepared data folder (test.csv, labels.json)")
    data_labels = read_labels(data_dir)
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("labels") != data_labels:
        raise ChampionError(
            f"{bundle} classifies {sorted(manifest.get('labels') or {})}; the data {data_dir} has classes "
            f"{sorted(data_labels)}: it cannot be scored on this data"
        )
    test = read_labelled(data_dir / "test.csv", data_labels)
    int8 = ORT_FILES["int8"] in manifest.get("files", {})
    classifier = EdgeClassifier(bundle, int8=int8)
    report = classification_report(
        test["label"].astype(int).tolist(), classifier.logits(test["text"].tolist()), classifier.names
    )
    return {
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "n": report["n"],
        "model": "int8" if int8 else "fp32",
    }


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, rule: PromotionRule) -> Verdict:
    """Promote when there is no champion, or when the challenger beats it by `rule.margin` on `rule.metric`."""
    metric = rule.metric
    new = challenger.get(metric)
    if new is None:  # e.g. judge_score when no judge ran: nothing to decide on, the champion stays
        scored = ", ".join(k for k in sorted(challenger) if k in HIGHER_IS_BETTER)
        return Verdict("keep", f"no {metric} score this run (scored: {scored})", metric, None, None, None, False)
    if not math.isfinite(new):  # a broken challenger is never promoted, even with no champion to beat
        why = f"the challenger's {metric} is {new}, not a finite number"
        return Verdict("keep", why, metric, new, None, None, True)
    if champion is None:
        return Verdict("promote", "no champion yet", metric, new, None, None, False)
    old = champion.get(metric)
    if old is None or not math.isfinite(old):
        why = f"the champion has no {metric} score on this data" if old is None else f"the champion's {metric} is {old}"
        return Verdict("promote", why, metric, new, old, None, False)
    improvement = (new - old) if HIGHER_IS_BETTER[metric] else (old - new)
    shown = f"{metric} {new:.4f} vs champion {old:.4f}"
    if improvement > 0 and reaches(improvement, rule.margin):
        return Verdict("promote", f"better: {shown}", metric, new, old, improvement, False)
    alert = -improvement > rule.alert_worse_by
    if improvement > 0:
        why = f"better by {improvement:.4f}, less than the margin {rule.margin:g}: {shown}"
    elif improvement == 0:
        why = f"no better: {shown}"
    else:
        why = f"worse by {-improvement:.4f}: {shown}"
    return Verdict("keep", why, metric, new, old, improvement, alert)


def comparison_rows(
    challenger: dict[str, Any], champion: dict[str, Any] | None, verdict: Verdict
) -> list[dict[str, Any]]:
    """The challenger-vs-champion table: one row per metric both have, and the decision."""
    metrics = [m for m in HIGHER_IS_BETTER if m in challenger or (champion and m in champion)]
    rows = []
    for metric in metrics:
        new, old = challenger.get(metric), (champion or {}).get(metric)
        rows.append(
            {
                "metric": metric + (" (decides)" if metric == verdict.metric else ""),
                "challenger": _round(new),
                "champion": _round(old),
                "difference": _round(new - old) if new is not None and old is not None else None,
            }
        )
    rows.append({"metric": "decision", "challenger": verdict.decision, "champion": None, "difference": verdict.reason})
    return rows


def _round(value: Any) -> Any:
    """4 decimals; a non-finite float as its name ("nan"), which JSON and the UI's tables can hold."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else str(value)
    return value


class PairwiseChallenge(StrictConfig):
    """What a pairwise decision needs besides the bundles: the challenger's test responses, the settings they were
    generated with (`InstructConfig.generation_key()`), the judge and the rule."""

    responses: str
    generation: dict[str, Any]
    judge: JudgeConfig
    rule: PairwiseRule


def bundle_responses(bundle: str | Path, responses: str | Path, generation: dict[str, Any]) -> Path:
    """The answers of a bundle's fp32 decoder to the instructions of a responses file, with the same generation
    settings; a stage keyed on the bundle, the instructions and the settings (a champion answers once per test
    set). fp32 greedy tokens equal PyTorch's (`edge.lm`), so a champion answers as the instruct stage answered for
    its challenger."""
    bundle, responses = Path(bundle), Path(responses)
    entries = [{k: e.get(k, "") for k in ("instruction", "input", "output")} for e in read_json(responses)]
    digest = sha256_file(bundle / "manifest.json")
    stage = Stage.declare(
        "bundle-responses",
        inputs={"bundle": digest, "instructions": sha256_json(entries)},
        config=generation,
        code=__name__,
        label=bundle.resolve().name,
    )

    def build(decision) -> Built:
        try:
            generator = EdgeGenerator(bundle)
        except BundleError as exc:  # a champion that cannot answer: not comparable on this data
            raise ChampionError(f"{bundle}: cannot answer the test instructions: {exc}") from None
        style = CHAT if generator.chat else (generator.manifest.get("prompt") or {}).get("style", "alpaca")
        sampling = {k: generation.get(k) for k in ("temperature", "top_k", "seed")}
        answers = []
        for entry in entries:
            ids = generator.instruction_ids(entry["instruction"], entry["input"], truncate=True)
            (text,) = generator.generate([ids], int(generation["max_new_tokens"]), **sampling)
            answers.append({**entry, DEFAULT_RESPONSE_KEY: clean_response(text, style)})
        write_json_atomic(stage.dir / RESPONSES_NAME, answers)
        return Built([RESPONSES_NAME], {"entries": len(answers)})

    stage.run(build)
    return stage.dir / RESPONSES_NAME


def decide_pairwise(summary: dict[str, Any], rule: PairwiseRule) -> Verdict:
    """Promote when the lower bound of the challenger's (A's) win-rate interval is above 0.5 + margin; alert when
    its upper bound is below 0.5 (the champion answers clearly better)."""
    win, ci = summary["win_rate"], summary["ci95"]
    if win is None:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary["unjudged_reasons"].items()) or "no pairs"
        return Verdict("keep", f"no pair got a verdict in both orders ({reasons})", PAIRWISE, None, None, None, False)
    low, high = ci
    threshold = 0.5 + rule.margin
    shown = (
        f"win rate {win:.1%}, 95% CI [{low:.1%}, {high:.1%}], {summary['wins']}/{summary['ties']}/"
        f"{summary['losses']} wins/ties/losses over {summary['n_judged']} pairs"
    )
    improvement = low - threshold
    if improvement > 0:
        return Verdict("promote", f"judged better: {shown}", PAIRWISE, win, 1 - win, improvement, False)
    why = f"lower bound not above {threshold:.0%}: {shown}"
    return Verdict("keep", why, PAIRWISE, win, 1 - win, improvement, high < 0.5)
