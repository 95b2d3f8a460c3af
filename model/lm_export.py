"""The language model to the edge: one ONNX decoder graph with a KV cache, int8 (model.quantize), the measured
quality gates (model.lm_quality), and the LM bundle that `python -m edge generate` and onnxruntime-genai run.

The decoder serves the prompt pass (empty past) and every decoding step (past of any length) with the input and
output names optimum and onnxruntime-genai use (see edge.lm). The tied LM head is stored once: the exported graph
reads the token embedding through Gather and the head through Transpose + MatMul of the same initializer.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge.lm import Decoder
from edge.runtime import LM, ORT_FILES
from edge.text import EOT_ID, PAD_ID
from gptflow.gates import within
from gptflow.prompts import format_prompt
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import read_json, write_json_atomic
from model.config import GPTConfig
from model.configs import ExportConfig
from model.files import CHECKPOINT_LMS
from model.genai import genai_files
from model.gpt import ConcatCache, GPTModel
from model.lm_quality import (
    decoder_parity,
    eval_rows,
    perplexity,
    token_agreement,
    tokens_per_second,
    torch_logits,
)
from model.onnx_export import BUNDLE_DIR, MODEL_FILES, REPORT, ExportError, export_graph, write_bundle
from model.opener import open_model
from model.quantize import check_perplexity_gate, quantize_decoder

MAX_BATCH = 1024
PARITY_STEPS = 32


class DecoderGraph(nn.Module):
    """`GPTModel` with the decoder's interface: (input_ids, attention_mask, position_ids, past) -> (logits,
    present), past and present as one (keys, values) pair per layer."""

    def __init__(self, model: GPTModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past):
        cache = ConcatCache(past)
        logits = self.model(input_ids, attention_mask, cache, position_ids)
        return logits, cache.present


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = [(i, kind) for i in range(n_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i, k in kv]
    return inputs, ["logits"] + [f"present.{i}.{k}" for i, k in kv]


def export_decoder(model: GPTModel, path: str | Path, metadata: dict[str, str]) -> Path:
    """`model` as the ONNX decoder (dynamic batch, sequence and past length, 0 included), one file."""
    cfg = model.cfg
    batch, seq, past = 2, 3, 4  # example sizes >= 2: the exporter specializes sizes 0 and 1
    shape = (batch, cfg.n_heads, past, cfg.head_dim)
    example = (
        torch.full((batch, seq), PAD_ID, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).expand(batch, seq),
        [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.n_layers)],
    )
    batch_dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq_dim = torch.export.Dim("seq", min=1, max=cfg.context_length)
    past_dim = torch.export.Dim("past", min=0, max=cfg.context_length - 1)
    shapes = {
        "input_ids": {0: batch_dim, 1: seq_dim},
        "attention_mask": {0: batch_dim, 1: torch.export.Dim.DYNAMIC},  # past + seq
        "position_ids": {0: batch_dim, 1: seq_dim},
        "past": [({0: batch_dim, 2: past_dim}, {0: batch_dim, 2: past_dim}) for _ in range(cfg.n_layers)],
    }
    inputs, outputs = io_names(cfg.n_layers)
    tokens = {0: "batch_size", 1: "sequence_length"}
    axes = {"input_ids": tokens, "position_ids": tokens, "logits": tokens}
    axes["attention_mask"] = {0: "batch_size", 1: "total_sequence_length"}
    for name in inputs[3:]:
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in outputs[1:]:
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    return export_graph(DecoderGraph(model.eval()), example, path, inputs, outputs, shapes, metadata, axes)


# ------------------------------------------------------------------------------------------------ stage


LM_EXPORT_HINT = "; a classifier exports to its edge bundle with its test split: `gptflow export best.pt`"


def prompt_template(style: str | None) -> dict[str, str] | None:
    """The bundle's prompt format as format strings with {instruction} and {input} fields."""
    if style is None:
        return None
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    marker_i, marker_n = "\x00instruction\x00", "\x00input\x00"

    def template(entry: dict[str, str]) -> str:
        text = escape(format_prompt(entry, style))
        return text.replace(marker_i, "{instruction}").replace(marker_n, "{input}")

    return {
        "style": style,
        "with_input": template({"instruction": marker_i, "input": marker_n}),
        "without_input": template({"instruction": marker_i, "input": ""}),
    }


def export_lm(
    checkpoint: str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None,
    config: ExportConfig,
    *,
    tokenizer: Any,
    tokenizer_files: tuple[Path, Path],
    resume: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Language-model checkpoint -> ONNX decoder fp32 (+ int8 with the perplexity gate), parity, agreement,
    LM bundle in `bundle/`, report and manifest in the stage folder. Raises ExportError /
    QuantizationGateError loudly."""
    opened = open_model(checkpoint, CHECKPOINT_LMS, hint=LM_EXPORT_HINT)
    path = opened.path
    data_dir = Path(data_dir)
    data_files = [data_dir / n for n in ("validation.json", "test.json", "val.bin") if (data_dir / n).is_file()]
    stage = Stage.declare(
        "export",
        inputs={"checkpoint": path, **{f.name: f for f in data_files}},
        config=config.identity(LM),
        code=__name__,
        label=f"lm-{path.parent.name}",
        out_dir=out_dir,
        force=force,
    )

    def build(decision: Decision) -> Built:
        model = opened.language_model()
        return _export(path, model, model.cfg, opened.style, stage, data_dir, config, tokenizer, tokenizer_files)

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}


def _export(
    path: Path,
    model: GPTModel,
    cfg: GPTConfig,
    style: str | None,
    stage: Stage,
    data_dir: Path,
    config: ExportConfig,
    tokenizer: Any,
    tokenizer_files: tuple[Path, Path],
) -> Built:
    out_dir, ckpt_sha = stage.dir, stage.inputs["checkpoint"]
    rows, prompts = eval_rows(data_dir, tokenizer, style, cfg.context_length, config)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = work / ORT_FILES["fp32"], work / ORT_FILES["int8"]
    meta = {"kind": LM, "tokenizer": "gpt2", "source_checkpoint_sha256": ckpt_sha, "prompt_style": style or ""}
    export_decoder(model, fp32_path, meta)
    fp32 = Decoder(fp32_path, cfg.context_length)
    parity = decoder_parity(model, fp32, sorted(prompts[:3], key=len), PARITY_STEPS)
    worst = max(parity["prompt_max_abs_logit_diff"], parity["steps_max_abs_logit_diff"])
    if not within(worst, config.lm_parity_atol):
        raise ExportError(
            f"export of {path}: the fp32 ONNX decoder does not reproduce "
            f"PyTorch: max |logit diff| {worst:.3g} (allowed {config.lm_parity_atol:g})"
        )
    quality: dict[str, Any] = {
        "perplexity_rows": len(rows),
        "perplexity": {"torch_fp32": perplexity(lambda r: torch_logits(model, r), rows)},
        "parity": parity,
    }
    quality["perplexity"]["onnx_fp32"] = perplexity(fp32.sequence_logits, rows)
    if not all(math.isfinite(p) for p in quality["perplexity"].values()):
        raise ExportError(f"export of {path}: validation perplexity is not finite: {quality['perplexity']}")
    speed = {"onnx_fp32": tokens_per_second(fp32, prompts[0], config.agreement_tokens)}
    if config.int8:
        quantize_decoder(fp32_path, int8_path, config.int8_block_size)
        int8 = Decoder(int8_path, cfg.context_length)
        ppl = quality["perplexity"]
        ppl["onnx_int8"] = perplexity(int8.sequence_logits, rows)
        quality["int8_perplexity_increase_pct"] = check_perplexity_gate(
            ppl["onnx_fp32"], ppl["onnx_int8"], config.max_ppl_increase, f"int8 of {path}"
        )
        quality["int8_agreement"] = token_agreement(fp32, int8, prompts, config.agreement_tokens)
        speed["onnx_int8"] = tokens_per_second(int8, prompts[0], config.agreement_tokens)
    quality["tokens_per_second"] = speed
    opset = int(fp32.session.get_modelmeta().custom_metadata_map["opset"])
    shape = {
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "emb_dim": cfg.emb_dim,
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
    }
    encoder_json, vocab_bpe = tokenizer_files
    copies = {ORT_FILES["fp32"]: fp32_path, "encoder.json": encoder_json, "vocab.bpe": vocab_bpe}
    if config.int8:
        copies[ORT_FILES["int8"]] = int8_path
    sizes = {name: Path(src).stat().st_size for name, src in copies.items() if name in ORT_FILES.values()}
    template = prompt_template(style)
    info = {
        "model": shape,
        "tokenizer": "gpt2",
        "eos_id": EOT_ID,
        "pad_id": PAD_ID,
        "prompt": template,
        "opset": opset,
        "source_checkpoint_sha256": ckpt_sha,
        "quality": quality,
    }
    documents = {**genai_files(cfg, tokenizer_files, ORT_FILES["fp32"]), "card.md": model_card(info, sizes)}
    bundle = write_bundle(out_dir / BUNDLE_DIR, LM, copies, documents, info)
    report = {
        "checkpoint": str(path),
        "checkpoint_sha256": ckpt_sha,
        "kind": LM,
        "bundle": str(bundle),
        "opset": opset,
        "quality": quality,
        "sizes_bytes": {"torch_checkpoint": path.stat().st_size, **sizes},
    }
    shutil.rmtree(work)
    write_json_atomic(out_dir / REPORT, report)
    metrics = {"perplexity": quality["perplexity"], **parity}
    if config.int8:
        metrics["int8_perplexity_increase_pct"] = quality["int8_perplexity_increase_pct"]
        metrics["int8_token_agreement"] = quality["int8_agreement"]["token_agreement"]
    return Built([REPORT] + [f"{BUNDLE_DIR}/{name}" for name in sorted(p.name for p in bundle.iterdir())], metrics)


def model_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model of an LM export (PyTorch fp32, ONNX fp32, ONNX int8): file MB, validation perplexity, tokens/s."""
    q, sizes = report["quality"], report["sizes_bytes"]
    return [
        {
            "model": model,
            "file_mb": round(sizes[file] / 1e6, 1),
            "perplexity": round(q["perplexity"][model], 4),
            "tokens_per_s": round(q["tokens_per_second"][model], 1) if model in q["tokens_per_second"] else None,
        }
        for model, file in MODEL_FILES.items()
        if file in sizes
    ]


def model_card(info: dict[str, Any], sizes: dict[str, int]) -> str:
    """The bundle's card: what it is, how it was checked, how to run it."""
    q, m = info["quality"], info["model"]
    ppl = q["perplexity"]
    lines = [
        "# gptflow language-model bundle",
        "",
        f"GPT-2 architecture: {m['n_layers']} layers, {m['n_heads']} heads, width {m['emb_dim']}, "
        f"context {m['context_length']}, vocabulary {m['vocab_size']}. Prompt format: "
        f"{info['prompt']['style'] if info['prompt'] else 'none (plain text)'}. "
        f"Source checkpoint sha256 `{info['source_checkpoint_sha256']}`; ONNX opset {info['opset']}.",
        "",
        "| file | MB |",
        "|---|---|",
        *[f"| {name} | {size / 1e6:.1f} |" for name, size in sizes.items()],
        "",
        f"Perplexity over {q['perplexity_rows']} validation rows: "
        + ", ".join(f"{name} {value:.4f}" for name, value in ppl.items())
        + ".",
        f"fp32 ONNX vs PyTorch, max |logit diff|: prompt pass {q['parity']['prompt_max_abs_logit_diff']:.2e}, "
        f"{q['parity']['steps']} cached steps {q['parity']['steps_max_abs_logit_diff']:.2e}.",
    ]
    if "int8_agreement" in q:
        a = q["int8_agreement"]
        lines.append(
            f"int8: perplexity {q['int8_perplexity_increase_pct']:+.2f}% vs fp32; greedy-token agreement with fp32 "
            f"{100 * a['token_agreement']:.2f}% over {a['tokens']} tokens, identical continuations "
            f"{100 * a['identical_continuations']:.1f}%."
        )
    lines += [
        "Tokens/s (batch 1, this export's machine): "
        + ", ".join(f"{name} {value:.1f}" for name, value in q["tokens_per_second"].items())
        + ".",
        "",
        'Run with onnxruntime alone: `python -m edge generate BUNDLE "instruction" [--int8]`; with '
        "onnxruntime-genai: `onnxruntime_genai.Model(BUNDLE)` (genai_config.json).",
        "",
    ]
    return "\n".join(lines)
