"""int8 quantization of a classifier: PyTorch dynamic int8 for the Linear layers, ONNX dynamic int8, and the
accuracy gate that fails the stage when int8 loses too much.

PyTorch: the built-in `torch.ao.quantization.quantize_dynamic`, whose deprecation warning is silenced here only.
torchao's replacement was slower than fp32 in eager CPU mode and is not in requirements.lock; torch int8 is a
baseline, the deployment target is onnxruntime. Measurements: docs/design-notes.md.

ONNX: `quant_pre_process` first, then `quantize_dynamic` with QInt8 weights. Quantizing `Gather` too stores the
token embedding as int8 (about 4x smaller files); `op_types=("MatMul",)` keeps it fp32.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from gptflow.errors import GptflowError
from gptflow.storage import atomic_path

DEFAULT_ONNX_OPS = ("MatMul", "Gather")


class QuantizationGateError(GptflowError):
    """int8 accuracy fell further below fp32 than the allowed margin; the int8 model is not shipped."""


def quantize_torch_dynamic(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a dynamic int8 Linear (int8 weights, activations
    quantized per batch at run time). CPU only; the input model is left as it is."""
    import copy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, op_types: Sequence[str] = DEFAULT_ONNX_OPS) -> Path:
    """Dynamic int8 (QInt8 weights, uint8 activations) of an ONNX model file, written atomically."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory(prefix="gptflow-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with atomic_path(int8_path) as out:
            quantize_dynamic(prepared, out, op_types_to_quantize=list(op_types), weight_type=QuantType.QInt8)
    return int8_path


def check_accuracy_gate(fp32_accuracy: float, int8_accuracy: float, max_drop_points: float, what: str) -> float:
    """The drop in percentage points; raises QuantizationGateError when it exceeds `max_drop_points`."""
    drop = 100.0 * (fp32_accuracy - int8_accuracy)
    if drop > max_drop_points:
        raise QuantizationGateError(
            f"{what}: int8 test accuracy {100 * int8_accuracy:.2f}% is {drop:.2f} points below fp32 "
            f"{100 * fp32_accuracy:.2f}% (allowed: {max_drop_points:g}); raise --max-int8-drop only if that loss "
            "is acceptable, or ship fp32"
        )
    return drop


def check_perplexity_gate(fp32_ppl: float, int8_ppl: float, max_increase_pct: float, what: str) -> float:
    """The int8 perplexity increase over fp32 in percent; raises QuantizationGateError above `max_increase_pct`."""
    increase = 100.0 * (int8_ppl / fp32_ppl - 1.0)
    if increase > max_increase_pct:
        raise QuantizationGateError(
            f"{what}: int8 perplexity {int8_ppl:.3f} is {increase:.2f}% above fp32 {fp32_ppl:.3f} (allowed: "
            f"{max_increase_pct:g}%); raise --max-ppl-increase only if that loss is acceptable, or ship fp32"
        )
    return increase
