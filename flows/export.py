"""Export flow: classifier checkpoint -> ONNX fp32/int8 with parity and int8 gate -> edge bundle."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from gptflow.settings import get_settings
from gptflow.storage import sha256_json
from model.onnx_export import ExportConfig
from tasks.export import export_bundle


@flow(name="export")
def export_flow(checkpoint: str, data_dir: str, config: ExportConfig = ExportConfig(),
                out_dir: str | None = None) -> dict:
    """`data_dir`: the data stage folder whose test split checks parity and the int8 gate. Outputs go to
    `<home>/export/<checkpoint folder>-<config hash>` by default; the bundle is its `bundle/` folder."""
    ckpt = Path(checkpoint)
    name = (ckpt if ckpt.is_dir() else ckpt.parent).name
    out = out_dir or str(get_settings().stage_dir("export") / f"{name}-{sha256_json(config.model_dump(mode='json'))[:8]}")
    return export_bundle(str(checkpoint), data_dir, out, config)
