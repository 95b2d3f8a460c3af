"""Champion vs challenger: score two bundles on the same current data, and decide whether to promote.

Both bundles are scored as they ship (the int8 model when the bundle has one, through onnxruntime alone), on
the current data version: a classifier on the test split, a language model by its validation perplexity.
A score is kept per data version (the sha256 of the split file), so the champion is re-scored only when the
data changed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from edge.runtime import ORT_FILES, EdgeClassifier
from eval.metrics import classification_report
from gptflow.errors import GptflowError
from gptflow.gates import reaches
from gptflow.settings import ollama_model_name
from gptflow.splits import read_labelled, read_labels
from gptflow.storage import sha256_file
from gptflow.strict import StrictConfig

# The metrics each registry may be compared on, and how an error names the model.
METRICS_OF = {
    "classifier": (("accuracy", "macro_f1"), "a classifier"),
    "lm": (("val_perplexity", "judge_score"), "a language model"),
}
HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "val_perplexity": False, "judge_score": True}


class ChampionError(GptflowError, ValueError):
    """A bundle or a data folder that cannot be scored."""


class PromotionRule(StrictConfig):
    """When a challenger replaces the champion, and when a worse one raises an alert."""

    metric: Literal["accuracy", "macro_f1", "val_perplexity", "judge_score"]
    margin: float = Field(default=0.0, ge=0, description="promote only when better by at least this much (and > 0)")
    alert_worse_by: float = Field(
        default=0.02, ge=0, description="alert when the challenger is worse than the champion by more than this"
    )


class PromotionConfig(StrictConfig):
    """The rule of each registry the pipeline feeds: its classifier bundle and its language-model bundle."""

    enabled: bool = Field(default=True, description="challenge the champions after the run (off: register nothing)")
    classifier: PromotionRule = PromotionRule(metric="accuracy", margin=0.0, alert_worse_by=0.02)
    lm: PromotionRule = PromotionRule(metric="val_perplexity", margin=0.0, alert_worse_by=1.0)
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
