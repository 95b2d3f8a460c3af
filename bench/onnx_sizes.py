"""The int8 GPT-2-small classifier from the legacy and the dynamo ONNX exporter: what makes their sizes differ.

    .venv/bin/python -m bench.onnx_sizes [--preset gpt2-small]

Exports the book's classifier (GPTModel whose out_head is replaced by Linear(emb, 2), last position) with
both exporters, quantizes each with the same onnxruntime dynamic int8 (default op types), and lists the
largest initializers of each int8 file by dtype, so the difference is named, not guessed.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from model.config import GPTConfig
from model.gpt import GPTModel
from model.quantize import quantize_onnx


class BookClassifier(torch.nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gpt = GPTModel(cfg)
        self.gpt.out_head = torch.nn.Linear(cfg.emb_dim, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids)[:, -1, :]


def summary(path: Path) -> str:
    model = onnx.load(path)
    inits = sorted(
        (
            (numpy_helper.to_array(t).nbytes, t.name, onnx.TensorProto.DataType.Name(t.data_type))
            for t in model.graph.initializer
        ),
        reverse=True,
    )
    by_type: dict[str, int] = {}
    for nbytes, _, dtype in inits:
        by_type[dtype] = by_type.get(dtype, 0) + nbytes
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    top = ", ".join(f"{n} {d} {b / 1e6:.1f}MB" for b, n, d in inits[:4])
    kinds = {
        k: v
        for k, v in ops.items()
        if k in ("Gather", "MatMul", "MatMulInteger", "DynamicQuantizeLinear", "Gemm", "Transpose", "DequantizeLinear")
    }
    return (
        f"{path.stat().st_size / 1e6:.1f} MB; bytes by dtype "
        f"{{{', '.join(f'{k}: {v / 1e6:.1f}MB' for k, v in by_type.items())}}}; "
        f"ops {kinds}; largest: {top}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt2-small")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = BookClassifier(GPTConfig.from_preset(args.preset)).eval()
    example = (torch.randint(0, 50257, (2, 8)),)
    tmp = Path(tempfile.mkdtemp(prefix="gptflow-onnx-sizes-"))
    warnings.simplefilter("ignore")
    for name, dynamo in (("legacy", False), ("dynamo", True)):
        fp32 = tmp / f"{name}.onnx"
        kwargs = (
            {
                "dynamic_shapes": {"input_ids": {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("t", max=1024)}},
                "external_data": False,
            }
            if dynamo
            else {"dynamic_axes": {"input_ids": {0: "b", 1: "t"}}}
        )
        torch.onnx.export(
            model,
            example,
            fp32,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamo=dynamo,
            opset_version=18,
            **kwargs,
        )
        int8 = quantize_onnx(fp32, tmp / f"{name}.int8.onnx", ("MatMul", "Gather"))
        print(f"{name} fp32: {summary(fp32)}")
        print(f"{name} int8: {summary(int8)}")


if __name__ == "__main__":
    main()
