"""`gptflow merge CHECKPOINT`: a LoRA checkpoint as a plain one, its adapters folded into the base's weights.

Every reader merges on the way already (`model.opener`), so merging is for keeping a model without its base: the
result is an ordinary `model.pt` (a language model) or `best.pt` (a classifier) with every field of the LoRA
checkpoint but the adapters (prompt style, tokenizer, labels, data folder), plus `source.merged_from`. A stage keyed
on the checkpoint and its base, so merging twice writes once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptflow.stage import Built, Decision, Stage
from model import lora
from model.checkpoint import save_model
from model.classifier import BEST, save_classifier
from model.files import EXPORTABLE, LM_FILE, CheckpointError
from model.opener import open_model

# Fields of a LoRA checkpoint that describe the adapters rather than the model: not copied to the merged one.
ADAPTER_FIELDS = {"format", "config", "model", "lora", "base", "source"}
CLASSIFIER_FIELDS = {"labels", "max_length", "tokenizer", "pooling", "pad_id"}  # save_classifier writes these


def merge_checkpoint(
    checkpoint: str | Path, out_dir: str | Path | None = None, *, force: bool = False, settings=None
) -> dict[str, Any]:
    """Merge the LoRA checkpoint `checkpoint` (a language model or a classifier) into the stage folder (`out_dir`,
    else `<home>/merge/<folder>-<key>`); returns the report: the merged file, its kind, the base, reused."""
    opened = open_model(checkpoint, EXPORTABLE, settings=settings)
    if opened.lora is None:
        raise CheckpointError(f"{opened.path} holds plain weights, not LoRA adapters: there is nothing to merge")
    base = lora.base_file(opened.state, opened.path, settings)
    classifier = opened.kind == "classifier"
    name = BEST if classifier else LM_FILE
    stage = Stage.declare(
        "merge",
        inputs={"checkpoint": opened.path, "base": base},
        config={"merge": "lora"},
        code=__name__,
        label=opened.path.parent.name,
        out_dir=out_dir,
        force=force,
    )

    def build(decision: Decision) -> Built:
        kept = {k: v for k, v in opened.state.items() if k not in ADAPTER_FIELDS}
        source = {**dict(opened.state.get("source") or {}), "merged_from": str(opened.path), "base": str(base)}
        if classifier:
            loaded = opened.classifier()
            fields = {k: v for k, v in kept.items() if k not in CLASSIFIER_FIELDS}
            save_classifier(
                stage.dir / name,
                loaded.model,
                loaded.labels,
                loaded.max_length,
                source,
                tokenizer=loaded.tokenizer_files,
                **fields,
            )
        else:
            save_model(stage.dir / name, opened.language_model(settings), **kept, source=source)
        return Built([name], {"kind": opened.kind, "base": str(base), "lora": _summary(opened.lora)})

    result = stage.run(build)
    return {
        "merged": str(stage.dir / name),
        "folder": str(stage.dir),
        "checkpoint": str(opened.path),
        "reused": result.reused,
        **result.metrics,
    }


def _summary(adapters: dict[str, Any]) -> dict[str, Any]:
    return {k: adapters[k] for k in ("rank", "alpha", "targets") if k in adapters}
