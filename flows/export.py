"""Export flow: classifier checkpoint -> ONNX fp32/int8 with parity and int8 gate -> edge bundle."""

from __future__ import annotations

from prefect import flow

from model.onnx_export import ExportConfig
from tasks.export import export_bundle


@flow(name="export")
def export_flow(
    checkpoint: str, data_dir: str, config: ExportConfig = ExportConfig(), out_dir: str | None = None
) -> dict:
    """`data_dir`: the data stage folder whose test split checks parity and the int8 gate. Outputs go to `out_dir`,
    else to the folder the stage contract names (`<home>/export/<checkpoint folder>-<key>`); the bundle is its
    `bundle/` folder."""
    return export_bundle(str(checkpoint), data_dir, config, out_dir)
