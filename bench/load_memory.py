"""Peak memory of `load_gpt2` at gpt2-small shapes relative to the safetensors file size.

    .venv/bin/python -m bench.load_memory [--path /tmp/gptflow-bench-gpt2-small]

Writes a random-weights gpt2-small `model.safetensors` (Hugging Face layout: transformer.* names, Conv1D
[in, out] weights) once, then loads it in fresh subprocesses and reports their peak RSS: `load_gpt2`
against torch-import-only and against the naive path (`safetensors.torch.load_file` then `load_state_dict`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MEASURE = r"""
import sys, json
import torch

def hwm_kib():  # VmHWM: peak resident set of this process image (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

mode, path = sys.argv[1], sys.argv[2]
if mode == "ours":
    from model.weights import load_gpt2
    model, _ = load_gpt2(path)
elif mode == "naive":
    from safetensors.torch import load_file
    from model.config import GPTConfig
    from model.gpt import GPTModel
    state = load_file(path + "/model.safetensors")
    model = GPTModel(GPTConfig.from_preset("gpt2-small"))
    n = sum(t.numel() for t in state.values())
print(json.dumps({"peak_kib": hwm_kib()}))
"""


def write_random_gpt2_small(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from model.config import GPTConfig

    cfg = GPTConfig.from_preset("gpt2-small")
    e, g = cfg.emb_dim, torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    tensors = {
        "transformer.wte.weight": r(cfg.vocab_size, e),
        "transformer.wpe.weight": r(cfg.context_length, e),
        "transformer.ln_f.weight": torch.ones(e),
        "transformer.ln_f.bias": torch.zeros(e),
    }
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        tensors |= {
            p + "ln_1.weight": torch.ones(e),
            p + "ln_1.bias": torch.zeros(e),
            p + "ln_2.weight": torch.ones(e),
            p + "ln_2.bias": torch.zeros(e),
            p + "attn.c_attn.weight": r(e, 3 * e),
            p + "attn.c_attn.bias": r(3 * e),
            p + "attn.c_proj.weight": r(e, e),
            p + "attn.c_proj.bias": r(e),
            p + "mlp.c_fc.weight": r(e, 4 * e),
            p + "mlp.c_fc.bias": r(4 * e),
            p + "mlp.c_proj.weight": r(4 * e, e),
            p + "mlp.c_proj.bias": r(e),
        }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder / "model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="/tmp/gptflow-bench-gpt2-small")
    args = ap.parse_args()
    folder = Path(args.path)
    file = folder / "model.safetensors"
    if not file.is_file():
        write_random_gpt2_small(folder)
    size_mib = file.stat().st_size / 2**20
    root = Path(__file__).resolve().parent.parent
    results = {}
    for mode in ("torch-only", "ours", "naive"):
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, mode, str(folder)], capture_output=True, text=True, cwd=root, check=True
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] / 1024
    base = results["torch-only"]
    print(f"gpt2-small random weights: {file} = {size_mib:.0f} MiB")
    print(f"peak RSS, python + torch only      : {base:7.0f} MiB")
    for mode, label in (("ours", "load_gpt2 (ours)"), ("naive", "load_file + build model (naive)")):
        extra = results[mode] - base
        print(f"peak RSS, {label:32s}: {results[mode]:7.0f} MiB  (+{extra:.0f} MiB = {extra / size_mib:.2f}x file)")


if __name__ == "__main__":
    main()
