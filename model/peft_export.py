"""A LoRA language model's adapters as a Hugging Face `peft` adapter (`gptflow export --format peft`):
`adapter_config.json` + `adapter_model.safetensors` that `PeftModel.from_pretrained` loads onto our Hugging Face
export of the base (`export --format hf`), megabytes instead of a merged model, with the base named in a README.

Our adapters sit on row slices of fused layers (model.lora). Llama and Qwen3 keep q/k/v and gate/up apart, so each
slice is one peft module. GPT-2's `c_attn` fuses q, k, v as ours does: n slices on it become one adapter of rank
n*r (A stacked, B block-placed, zeros elsewhere), its alpha n*alpha in `rank_pattern`/`alpha_pattern` so that the
scale stays alpha/r. Module names come from `model.hf_models.tensor_map`, the map the Hugging Face export inverts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gptflow.stage import Built, Decision, Stage
from gptflow.storage import atomic_dir, atomic_path, read_json, write_json_atomic, write_text_atomic
from model.checkpoint import load_checkpoint
from model.config import GPTConfig
from model.files import EXPORTABLE
from model.hf_export import ARCHITECTURES, hf_export_config
from model.hf_models import part_rows, tensor_map
from model.onnx_export import REPORT, ExportError
from model.opener import OpenedModel, open_model

ADAPTER_DIR = "adapter"
CONFIG_FILE, WEIGHTS_FILE, README = "adapter_config.json", "adapter_model.safetensors", "README.md"
PREFIX = "base_model.model."  # what peft's save_pretrained puts before a module's path
LAYER = re.compile(r"^(transformer\.h|model\.layers)\.\d+\.")  # a block's prefix in Hugging Face module paths
PEFT_HINT = (  # format with folder=
    "peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF_FOLDER), '{folder}'), "
    "BASE_HF_FOLDER being our Hugging Face export of the base: README.md there names it"
)
Part = tuple[str, int, int, int]  # Hugging Face module, [start, end) of our module's rows, its input width


def check_exportable(opened: OpenedModel) -> None:
    """Only a LoRA language model has adapters peft can load onto a causal LM: anything else is one line."""
    if opened.kind in ("classifier", "ensemble"):
        raise ExportError(
            f"{opened.path} is a classifier checkpoint: peft adapters are written for language models; export the "
            f"classifier to ONNX instead (gptflow export {opened.path})"
        )
    if opened.kind not in ("lm", "instruct") or not opened.lora:
        raise ExportError(
            f"{opened.path} holds whole weights, not LoRA adapters: nothing to export as a peft adapter "
            f"(gptflow export {opened.path} --format hf writes the whole model)"
        )


def hf_modules(cfg: GPTConfig) -> dict[str, list[Part]]:
    """Our linear layers -> the Hugging Face modules their output rows are, in row order."""
    q, kv, hidden, emb = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.emb_dim
    widths = {  # rows, input width
        "attn.qkv": (q + 2 * kv, emb),
        "attn.proj": (emb, q),
        "mlp.fc": (hidden * (2 if cfg.mlp == "swiglu" else 1), emb),
        "mlp.proj": (emb, hidden),
        "out_head": (cfg.vocab_size, emb),
    }
    modules: dict[str, list[Part]] = {}
    for ours, parts in {**tensor_map(cfg), "out_head.weight": [("lm_head.weight", False)]}.items():
        module = ours.removesuffix(".weight")
        layer = module.split(".", 2)[2] if module.startswith("blocks.") else module
        if not ours.endswith(".weight") or layer not in widths:
            continue
        rows, width = widths[layer]
        start, modules[module] = 0, []
        for (theirs, _), size in zip(parts, part_rows(cfg, len(parts), rows)):
            modules[module].append((theirs.removesuffix(".weight"), start, start + size, width))
            start += size
    return modules


def peft_tensors(cfg: GPTConfig, state: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapters under peft's names, and per Hugging Face module (its part, the slices fused into it)."""
    lora, modules, rank = state["lora"], hf_modules(cfg), state["lora"]["rank"]
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, tuple[str, Part, list[tuple[str, int, int]]]] = {}  # HF module -> ours, part, slices
    for module, slices in lora["modules"].items():
        for name, (start, end) in sorted(slices.items(), key=lambda item: item[1][0]):
            part = next((p for p in modules.get(module, []) if p[1] <= start and end <= p[2]), None)
            if part is None:
                raise ExportError(
                    f"{path}: LoRA adapter {module}.{name} (rows {start}-{end}) fits no module of Hugging Face "
                    f"{ARCHITECTURES[cfg.family]}; expected the layers model.lora.plan adapts"
                )
            layout.setdefault(part[0], (module, part, []))[2].append((name, start, end))
    for hf, (module, (_, lo, hi, width), members) in layout.items():
        a_parts, b = [], None
        for i, (name, start, end) in enumerate(members):
            a, b_i = state["model"].get(f"{module}.lora_A.{name}"), state["model"].get(f"{module}.lora_B.{name}")
            if a is None or b_i is None or a.shape != (rank, width) or b_i.shape != (end - start, rank):
                raise ExportError(
                    f"{path}: adapter {module}.{name} is missing or misshapen; expected A ({rank}, {width}) and "
                    f"B ({end - start}, {rank})"
                )
            b = torch.zeros(hi - lo, rank * len(members), dtype=b_i.dtype) if b is None else b
            b[start - lo : end - lo, i * rank : (i + 1) * rank] = b_i
            a_parts.append(a)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = torch.cat(a_parts).contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.contiguous()
    return tensors, layout


def adapter_config(cfg: GPTConfig, lora: dict[str, Any], layout: dict) -> dict[str, Any]:
    """`adapter_config.json`: the layer-free suffixes (`self_attn.q_proj`) where every block is adapted alike, else
    full module paths; a fused GPT-2 module's rank and alpha scaled by its slice count."""
    every = Counter(LAYER.sub("", p[0]) for parts in hf_modules(cfg).values() for p in parts)
    fused = {hf: len(members) for hf, (_, _, members) in layout.items()}
    short = {hf: LAYER.sub("", hf) for hf in fused}
    uniform = all(
        Counter(short.values())[s] == every[s] and len({fused[h] for h in fused if short[h] == s}) == 1
        for s in short.values()
    )
    key = short if uniform else {hf: hf for hf in fused}
    rank, alpha = lora["rank"], lora["alpha"]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,  # our Hugging Face export of the base, wherever it is (README.md)
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": lora.get("dropout", 0.0),
        "target_modules": sorted(set(key.values())),
        "rank_pattern": {key[hf]: rank * n for hf, n in sorted(fused.items()) if n > 1},
        "alpha_pattern": {key[hf]: alpha * n for hf, n in sorted(fused.items()) if n > 1},
        "fan_in_fan_out": cfg.family == "gpt2",  # GPT-2's Conv1D stores [in, out]
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def check_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict, layout: dict, scale: float) -> None:
    """Read the adapter back: the same config and tensors, each module's A (r', in) and B (rows, r') as the Hugging
    Face model's widths want, and alpha'/r' (looked up as peft does) equal to the checkpoint's scale."""
    got = load_file(folder / WEIGHTS_FILE)
    same = got.keys() == tensors.keys() and all(torch.equal(got[name], t) for name, t in tensors.items())
    if not same or json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")) != config:
        raise ExportError(f"{folder}: {CONFIG_FILE} or {WEIGHTS_FILE} does not read back as written")

    def pattern(patterns: dict[str, Any], hf: str, default: Any) -> Any:  # peft's get_pattern_key
        return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", hf)), default)

    for hf, (_, (_, lo, hi, width), members) in layout.items():
        r, alpha = (
            pattern(config["rank_pattern"], hf, config["r"]),
            pattern(config["alpha_pattern"], hf, config["lora_alpha"]),
        )
        a, b = got[f"{PREFIX}{hf}.lora_A.weight"], got[f"{PREFIX}{hf}.lora_B.weight"]
        want = (r, width), (hi - lo, r)
        if (a.shape, b.shape) != want or r != config["r"] * len(members) or abs(alpha / r - scale) > 1e-9 * scale:
            raise ExportError(
                f"{folder}: {hf} reads back as A {tuple(a.shape)}, B {tuple(b.shape)}, scale {alpha / r:g}; expected "
                f"A {want[0]}, B {want[1]} of rank {config['r']} x {len(members)}, scale {scale:g}"
            )


def readme(cfg: GPTConfig, state: dict[str, Any], config: dict[str, Any]) -> str:
    """Which base the adapter fits (init spec, sha256) and how to load it."""
    base, lora = state.get("base") or {}, state["lora"]
    init, path = str(base.get("init", "?")), str(base.get("path", "?"))
    if init.startswith("gpt2:"):
        make = (
            f"`gptflow load-gpt2 {init[5:]}`, then `gptflow export <its model.pt> --format hf` (or the Hugging Face "
            "GPT-2 model of those public weights itself)"
        )
    else:
        make = f"`gptflow export {path} --format hf` (its `hf/` folder)"
    lines = [
        f"# LoRA adapter ({ARCHITECTURES[cfg.family]}, peft)",
        "",
        f"Rank {lora['rank']}, alpha {lora['alpha']:g} (scale {lora['alpha'] / lora['rank']:g}), targets "
        f"{', '.join(lora['targets'])}: peft modules {', '.join(config['target_modules'])}.",
        "",
        f"Base: `{init}`, file `{path}`, sha256 `{base.get('sha256', '?')}`. The adapters fit those weights only.",
        f"Load them onto our Hugging Face export of that base: {make}.",
    ]
    try:
        base_is_lora = "lora" in load_checkpoint(path, mmap=True)
    except Exception:  # noqa: BLE001 - the base need not be here to export its adapters
        base_is_lora = False
    if base_is_lora:  # what it says holds either way: a LoRA base is read merged, by export --format hf too
        lines.append(
            "The base is itself a LoRA checkpoint: these adapters sit on its merged weights, which is what its Hugging "
            "Face export holds (it merges on the way)."
        )
    code = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        'base = AutoModelForCausalLM.from_pretrained("BASE_HF_FOLDER")',
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER")',
    ]
    if "lm_head" in config["target_modules"]:
        lines.append(
            "The head is adapted: before `merge_and_unload()`, untie a head the base ties to its token embedding "
            "(merging would change the embedding too), between loading the base and the adapter:"
        )
        code[4:4] = [
            "base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())  # untie, to merge",
            "base.config.tie_word_embeddings = False",
        ]
        code[0:0] = ["import torch"]
    return "\n".join(
        lines + ["", "```python", *code, "model = model.merge_and_unload()  # optional: plain weights", "```", ""]
    )


def export_peft(checkpoint: str | Path, out_dir: str | Path | None = None, *, force: bool = False, settings=None):
    """A LoRA language-model checkpoint -> a peft adapter folder (`adapter/` in the stage folder), read back and
    checked before the stage certifies it. The base is not needed: the adapters are the checkpoint's own tensors."""
    opened = open_model(checkpoint, EXPORTABLE, settings=settings)
    check_exportable(opened)
    path, cfg = opened.path, opened.config
    hf_export_config(cfg, torch.float32, None, [])  # a shape no Hugging Face class has: one line, before any work
    stage = Stage.declare(
        "export",
        inputs={"checkpoint": path},
        config={"format": "peft"},
        code=__name__,
        label=f"peft-{path.parent.name}",
        out_dir=out_dir,
        force=force,
    )

    def build(decision: Decision) -> Built:
        state = opened.state
        tensors, layout = peft_tensors(cfg, state, path)
        config = adapter_config(cfg, state["lora"], layout)
        folder = stage.dir / ADAPTER_DIR
        with atomic_dir(folder) as tmp:
            with atomic_path(tmp / WEIGHTS_FILE) as part:
                save_file(tensors, part, metadata={"format": "pt"})
            write_json_atomic(tmp / CONFIG_FILE, config)
            write_text_atomic(tmp / README, readme(cfg, state, config))
        check_folder(folder, tensors, config, layout, state["lora"]["alpha"] / state["lora"]["rank"])
        names = (CONFIG_FILE, WEIGHTS_FILE, README)
        report = {
            "checkpoint": str(path),
            "checkpoint_sha256": stage.inputs["checkpoint"],
            "kind": "peft",
            "family": cfg.family,
            "architecture": ARCHITECTURES[cfg.family],
            "folder": str(folder),
            "rank": state["lora"]["rank"],
            "alpha": state["lora"]["alpha"],
            "targets": list(state["lora"]["targets"]),
            "target_modules": config["target_modules"],
            "base": state.get("base"),
            "sizes_bytes": {"torch_checkpoint": path.stat().st_size}
            | {name: (folder / name).stat().st_size for name in names},
        }
        write_json_atomic(stage.dir / REPORT, report)
        return Built([REPORT] + [f"{ADAPTER_DIR}/{n}" for n in names], {"rank": report["rank"], "modules": len(layout)})

    result = stage.run(build)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}
