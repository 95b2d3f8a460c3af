"""A language-model checkpoint as a Hugging Face GPT-2 folder (`gptflow export --format hf`), read back through our
own loader and compared before the stage certifies it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gptflow.stage import Built, Decision, Stage
from gptflow.storage import read_json, write_json_atomic
from model.files import CHECKPOINT_LMS
from model.lm_export import LM_EXPORT_HINT
from model.lm_quality import torch_logits
from model.onnx_export import REPORT, ExportError
from model.opener import open_model
from model.weights import load_gpt2, save_hf_gpt2

HF_DIR = "hf"


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path | None,
    *,
    tokenizer_files: tuple[Path, Path],
    resume: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Language-model checkpoint -> a Hugging Face GPT-2 folder (`hf/` in the stage folder: config.json,
    model.safetensors, tokenizer files) that transformers loads; read back through our loader and compared."""
    opened = open_model(checkpoint, CHECKPOINT_LMS, hint=LM_EXPORT_HINT)
    path = opened.path
    stage = Stage.declare(
        "export",
        inputs={"checkpoint": path},
        config={"format": "hf"},
        code=__name__,
        label=f"hf-{path.parent.name}",
        out_dir=out_dir,
        force=force,
    )

    def build(decision: Decision) -> Built:
        model, cfg = opened.language_model(), opened.config
        folder = save_hf_gpt2(model, stage.dir / HF_DIR, tokenizer_files=tokenizer_files)
        reloaded, _ = load_gpt2(folder)
        row = [i % cfg.vocab_size for i in range(min(16, cfg.context_length))]
        diff = float(np.abs(torch_logits(model, row) - torch_logits(reloaded, row)).max())
        if diff > 0:
            raise ExportError(f"{folder} does not read back to the same model (max |logit diff| {diff:.3g})")
        report = {"checkpoint": str(path), "kind": "hf", "folder": str(folder), "roundtrip_max_abs_logit_diff": diff}
        write_json_atomic(stage.dir / REPORT, report)
        return Built([REPORT] + [f"{HF_DIR}/{p.name}" for p in sorted(folder.iterdir())], {"roundtrip": diff})

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}
