"""int8 quantization: for a classifier, PyTorch dynamic int8 for the Linear layers, ONNX dynamic int8, and the
accuracy gate that fails the stage when int8 loses too much.

PyTorch: the built-in `torch.ao.quantization.quantize_dynamic`, whose deprecation warning is silenced here only.
torchao's replacement was slower than fp32 in eager CPU mode and is not in requirements.lock; torch int8 is a
baseline, the deployment target is onnxruntime. Measurements: docs/design-notes.md.

ONNX: `quant_pre_process` first, then `quantize_dynamic` with QInt8 weights. Quantizing `Gather` too stores the
token embedding as int8 (about 4x smaller files); `op_types=("MatMul",)` keeps it fp32.

The language model's int8 (`quantize_decoder`) is weight-only, blockwise (onnxruntime's MatMulNBits, 8 bits,
symmetric, accuracy level 4): activations are quantized per row and block inside the kernel, so a token's logits
do not depend on the other tokens of the call, and generation with and without the cache gives the same tokens.
Per-tensor dynamic quantization (MatMulInteger) scales activations over the whole call, which is what makes cached
and uncached int8 differ. onnxruntime's quantizer only takes a MatMul whose weight is an initializer, and its
8-bit Gather is not supported, so the token embedding is quantized here: its lookup gathers int8 rows and
dequantizes them, and a tied head becomes a MatMulNBits over the same int8 rows (one copy for both uses). An untied
head (Llama 3.2, SmolLM's larger sizes) is a MatMul with its own weight, which the quantizer takes like any other.
The same holds for every family: GPT-2, Llama (grouped-query attention, SwiGLU) and Qwen3 (q/k norms, which stay
fp32 like every norm).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gptflow.errors import GptflowError
from gptflow.gates import within
from gptflow.storage import atomic_path
from model.configs import DEFAULT_ONNX_OPS


class QuantizationError(GptflowError, ValueError):
    """A graph cannot be quantized as asked (a block size that is not a power of two, no embedding Gather)."""


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
    if not within(drop, max_drop_points):
        raise QuantizationGateError(
            f"{what}: int8 test accuracy {100 * int8_accuracy:.2f}% is {drop:.2f} points below fp32 "
            f"{100 * fp32_accuracy:.2f}% (allowed: {max_drop_points:g}); raise --max-int8-drop only if that loss "
            "is acceptable, or ship fp32"
        )
    return drop


def check_perplexity_gate(fp32_ppl: float, int8_ppl: float, max_increase_pct: float, what: str) -> float:
    """The int8 perplexity increase over fp32 in percent; raises QuantizationGateError above `max_increase_pct`."""
    increase = 100.0 * (int8_ppl / fp32_ppl - 1.0) if math.isfinite(fp32_ppl) else math.nan
    if not within(increase, max_increase_pct):
        raise QuantizationGateError(
            f"{what}: int8 perplexity {int8_ppl:.3f} is {increase:.2f}% above fp32 {fp32_ppl:.3f} (allowed: "
            f"{max_increase_pct:g}%); raise --max-ppl-increase only if that loss is acceptable, or ship fp32"
        )
    return increase


def quantize_decoder(fp32_path: str | Path, int8_path: str | Path, block_size: int = 128) -> Path:
    """Weight-only blockwise int8 of the decoder (module docstring): every MatMul with a weight initializer
    through onnxruntime's MatMulNBits quantizer, then the token embedding (tied head included) here."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(f"int8 block size {block_size}: expected a power of two >= 16")
    proto = onnx.load(fp32_path)
    while block_size > max(16, _narrowest_row(proto)):  # a block wider than the rows would only store padding
        block_size //= 2
    quantizer = MatMulNBitsQuantizer(
        proto, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",)
    )
    quantizer.process()
    proto = quantizer.model.model
    _quantize_embedding(proto, block_size)
    int8_path = Path(int8_path)
    with atomic_path(int8_path) as tmp:
        onnx.save(proto, tmp)
        onnx.checker.check_model(str(tmp))
    return int8_path


def _narrowest_row(proto: onnx.ModelProto) -> int:
    """The shortest row (K, the input width) of the matrices to quantize: the MatMul weights ([K, N] initializers)
    and the token embedding ([vocab, emb]). K is the width, q heads x head size, or the MLP's hidden width."""
    inits = {t.name: t for t in proto.graph.initializer}
    widths = [
        inits[n.input[1]].dims[0]
        for n in proto.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
    ]
    widths += [
        inits[n.input[0]].dims[1]
        for n in proto.graph.node
        if n.op_type == "Gather"
        and n.input[1] == "input_ids"
        and n.input[0] in inits
        and len(inits[n.input[0]].dims) == 2
    ]
    return min((int(w) for w in widths if w > 0), default=16)


def blockwise_int8(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `weight` (N, K) as MatMulNBits stores them: uint8 (N, blocks, block_size) with the implicit zero
    point 128, and float scales (N, blocks); K is zero-padded to whole blocks."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    n, k = weight.shape
    blocks = math.ceil(k / block_size)
    packed = np.zeros((n, blocks, block_size), dtype=np.uint8)
    scales = np.zeros(n * blocks, dtype=np.float32)
    zero_points = np.zeros((n, blocks), dtype=np.uint8)  # unused when symmetric
    quantize_matmul_8bits(packed, np.ascontiguousarray(weight.T), scales, zero_points, block_size, n, k, True)
    return packed, scales.reshape(n, blocks)


def _quantize_embedding(proto: onnx.ModelProto, block_size: int) -> None:
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next(
        (n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in inits), None
    )
    if gather is None:
        raise QuantizationError("the decoder graph has no token-embedding Gather over input_ids; cannot quantize it")
    table = inits[gather.input[0]]
    weight = numpy_helper.to_array(table).astype(np.float32)
    vocab, emb = weight.shape
    packed, scales = blockwise_int8(weight, block_size)
    q_name, s_name = f"{table.name}_Q8", f"{table.name}_scales"
    graph.initializer.extend([numpy_helper.from_array(packed, q_name), numpy_helper.from_array(scales, s_name)])

    # The tied head: MatMul(hidden, Transpose(table)) -> MatMulNBits over the same int8 rows.
    consumers = [n for n in graph.node if table.name in n.input and n is not gather]
    for transpose in [n for n in consumers if n.op_type == "Transpose"]:
        for matmul in [n for n in graph.node if n.op_type == "MatMul" and n.input[1] == transpose.output[0]]:
            head = helper.make_node(
                "MatMulNBits",
                [matmul.input[0], q_name, s_name],
                list(matmul.output),
                name=f"{matmul.name}_Q8",
                domain="com.microsoft",
                K=emb,
                N=vocab,
                bits=8,
                block_size=block_size,
                accuracy_level=4,
            )
            _replace(graph, matmul, [head])
        if not any(transpose.output[0] in n.input for n in graph.node):
            graph.node.remove(transpose)

    # The embedding: gather int8 rows and their scales, (q - 128) * scale, blocks back to one row of `emb`.
    out, p = gather.output[0], f"{table.name}_dq"
    consts = [
        numpy_helper.from_array(np.array(128.0, dtype=np.float32), f"{p}_zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_last"),
        numpy_helper.from_array(np.array([packed.shape[1] * block_size], dtype=np.int64), f"{p}_width"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), f"{p}_start"),
        numpy_helper.from_array(np.array([emb], dtype=np.int64), f"{p}_emb"),
    ]
    graph.initializer.extend(consts)
    nodes = [
        helper.make_node("Gather", [q_name, "input_ids"], [f"{p}_q"], name=f"{p}_gather_q"),
        helper.make_node("Gather", [s_name, "input_ids"], [f"{p}_s"], name=f"{p}_gather_s"),
        helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{p}_f", f"{p}_zero"], [f"{p}_c"], name=f"{p}_center"),
        helper.make_node("Unsqueeze", [f"{p}_s", f"{p}_last"], [f"{p}_su"], name=f"{p}_unsqueeze"),
        helper.make_node("Mul", [f"{p}_c", f"{p}_su"], [f"{p}_d"], name=f"{p}_scale"),
        helper.make_node("Shape", ["input_ids"], [f"{p}_bt"], name=f"{p}_shape"),
        helper.make_node("Concat", [f"{p}_bt", f"{p}_width"], [f"{p}_shape3"], name=f"{p}_concat", axis=0),
        helper.make_node("Reshape", [f"{p}_d", f"{p}_shape3"], [f"{p}_r"], name=f"{p}_reshape"),
        helper.make_node("Slice", [f"{p}_r", f"{p}_start", f"{p}_emb", f"{p}_last"], [out], name=f"{p}_slice"),
    ]
    _replace(graph, gather, nodes)
    if not any(table.name in n.input for n in graph.node):
        graph.initializer.remove(table)


def _replace(graph: onnx.GraphProto, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """Put `new` where `node` was (nodes stay topologically sorted)."""
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, n in enumerate(new):
        graph.node.insert(at + offset, n)
