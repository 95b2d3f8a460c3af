"""The language model to the edge: one ONNX decoder graph with a KV cache, int8 (model.quantize), the measured
quality gates (model.lm_quality), and the LM bundle that `python -m edge generate` and onnxruntime-genai run.

The decoder serves the prompt pass (empty past) and every decoding step (past of any length) with the input and
output names optimum and onnxruntime-genai use (see edge.lm), for every family: GPT-2 (learned positions), Llama
and Qwen3 (rotary positions computed in the graph from `position_ids`, Llama 3's frequency stretch included; a
grouped-query cache of `kv_heads` key/value heads). A tied LM head is stored once: the exported graph reads the
token embedding through Gather and the head through Transpose + MatMul of the same initializer.

The bundle carries the tokenizer its runtime needs: GPT-2's encoder.json and vocab.bpe, or the model's own Hugging
Face tokenizer files (the texts its checkpoint keeps), and its manifest says which. Without int8 no data set is
needed (parity runs on probe prompts); int8's perplexity gate measures on `--data`, by default the folder the
checkpoint records it was trained on.
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
from gptflow.gates import within
from gptflow.prompts import CHAT, CHAT_KWARGS, format_prompt
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import read_json, write_json_atomic
from model.configs import ExportConfig
from model.files import CHECKPOINT_LMS
from model.genai import genai_files
from model.gpt import ConcatCache, GPTModel
from model.init import text_tokenizer
from model.instruct import prompt_ids
from model.lm_quality import (
    decoder_parity,
    eval_rows,
    eval_style,
    perplexity,
    token_agreement,
    tokens_per_second,
    torch_logits,
)
from model.onnx_export import BUNDLE_DIR, MODEL_FILES, REPORT, ExportError, export_graph, write_bundle
from model.opener import OpenedModel, open_model
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
    shape = (batch, cfg.kv_heads, past, cfg.head_dim)
    example = (
        torch.zeros((batch, seq), dtype=torch.long),
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
FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}
# Instructions the fp32 parity check runs on when no data set is given (the model's own prompt format applies).
PROBES = ("Name three primary colors.", "Rewrite the sentence in the past tense: The cat sits on the mat.")
DATA_HINT = "an instructions data folder (validation.json, test.json) or a corpus folder (val.bin)"


def prompt_template(style: str | None) -> dict[str, Any] | None:
    """The bundle's prompt format: for a text style, format strings with {instruction} and {input} fields; for a
    model tuned in its chat template (style "chat"), the keywords its template is rendered with."""
    if style is None:
        return None
    if style == CHAT:
        return {"style": CHAT, "chat_kwargs": dict(CHAT_KWARGS)}
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


def lm_data_dir(opened: OpenedModel, data_dir: str | Path | None, int8: bool, settings=None) -> Path | None:
    """The folder an LM export measures perplexity (and int8's gate) on: `data_dir` when given; without int8 none
    (the fp32 parity check needs no data); with int8 the folder the checkpoint records it was trained on, else for
    an instruction model `<home>/data/instructions` when it was prepared; else an ExportError that says what to
    pass."""
    if data_dir is not None:
        return Path(data_dir)
    if not int8:
        return None
    recorded = opened.state.get("data_dir") if opened.state is not None else None
    if isinstance(recorded, str) and Path(recorded).is_dir():
        return Path(recorded)
    if opened.style:
        from gptflow.settings import get_settings

        folder = (settings or get_settings()).home / "data" / "instructions"
        if (folder / "validation.json").is_file() and (folder / "test.json").is_file():
            return folder
    where = f" (the checkpoint records {recorded}, which is not a folder)" if recorded else ""
    raise ExportError(
        f"--data: int8's perplexity gate needs data to measure on{where}: give {DATA_HINT}; "
        "without --int8 the export needs none"
    )


def export_lm(
    checkpoint: str | Path,
    data_dir: str | Path | None,
    out_dir: str | Path | None,
    config: ExportConfig,
    *,
    tokenizer: Any = None,
    tokenizer_files: tuple[Path, Path] | None = None,
    settings=None,
    resume: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Language-model checkpoint -> ONNX decoder fp32 (+ int8 with the perplexity gate), parity, agreement,
    LM bundle in `bundle/`, report and manifest in the stage folder. Raises ExportError /
    QuantizationGateError loudly.

    The model reads text with its own tokenizer: the Hugging Face one its checkpoint keeps, else GPT-2's BPE
    (`tokenizer`, a tiktoken encoding or `GPT2Text`, and `tokenizer_files` = encoder.json, vocab.bpe, which the
    bundle ships; fetched through the download layer when not given). `data_dir`: see `lm_data_dir`."""
    opened = open_model(checkpoint, CHECKPOINT_LMS, hint=LM_EXPORT_HINT)
    path = opened.path
    data = lm_data_dir(opened, data_dir, config.int8, settings)
    names = ("validation.json", "test.json", "val.bin", "meta.json")
    data_files = [data / n for n in names if (data / n).is_file()] if data is not None else []
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
        files = opened.state.get("tokenizer") if opened.state is not None else None
        text = text_tokenizer(files, tokenizer, settings)
        gpt2_files = None
        if not files:
            from gptflow.tokenizer import tokenizer_files as fetch_gpt2_files

            gpt2_files = tokenizer_files or fetch_gpt2_files(settings)
        model = opened.language_model()
        return _export(path, model, opened.style, stage, data, config, text, gpt2_files, settings)

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}


def probe_prompts(tokenizer: Any, style: str | None, room: int) -> list[list[int]]:
    """Token ids of the probe instructions in the model's prompt format, each at most `room` tokens."""
    style = eval_style(tokenizer, style)
    return [prompt_ids(tokenizer, {"instruction": text, "input": ""}, style)[-room:] for text in PROBES]


def _export(
    path: Path,
    model: GPTModel,
    style: str | None,
    stage: Stage,
    data_dir: Path | None,
    config: ExportConfig,
    tokenizer: Any,
    gpt2_files: tuple[Path, Path] | None,
    settings=None,
) -> Built:
    cfg = model.cfg
    out_dir, ckpt_sha = stage.dir, stage.inputs["checkpoint"]
    rows: list[list[int]] = []
    room = max(1, cfg.context_length - PARITY_STEPS)
    prompts = probe_prompts(tokenizer, style, room)
    if data_dir is not None:
        rows, prompts = eval_rows(data_dir, tokenizer, style, cfg.context_length, config, settings=settings)
    hf = gpt2_files is None
    eos_ids = list(tokenizer.eos_ids)
    if not eos_ids:
        raise ExportError(f"export of {path}: the model's tokenizer names no end token, so generation could never stop")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else eos_ids[0]
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = work / ORT_FILES["fp32"], work / ORT_FILES["int8"]
    meta = {
        "kind": LM,
        "family": cfg.family,
        "tokenizer": "hf" if hf else "gpt2",
        "source_checkpoint_sha256": ckpt_sha,
        "prompt_style": style or "",
    }
    export_decoder(model, fp32_path, meta)
    fp32 = Decoder(fp32_path, cfg.context_length)
    parity = decoder_parity(model, fp32, sorted(prompts[:3], key=len), PARITY_STEPS, pad_id=pad_id)
    worst = max(parity["prompt_max_abs_logit_diff"], parity["steps_max_abs_logit_diff"])
    if not within(worst, config.lm_parity_atol):
        raise ExportError(
            f"export of {path}: the fp32 ONNX decoder does not reproduce "
            f"PyTorch: max |logit diff| {worst:.3g} (allowed {config.lm_parity_atol:g})"
        )
    quality: dict[str, Any] = {"parity": parity}
    if rows:
        ppl = {"torch_fp32": perplexity(lambda r: torch_logits(model, r), rows)}
        ppl["onnx_fp32"] = perplexity(fp32.sequence_logits, rows)
        if not all(math.isfinite(p) for p in ppl.values()):
            raise ExportError(f"export of {path}: validation perplexity is not finite: {ppl}")
        quality.update(perplexity_rows=len(rows), perplexity=ppl)
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
        "family": cfg.family,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "emb_dim": cfg.emb_dim,
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "positions": cfg.positions,
    }
    copies = {ORT_FILES["fp32"]: fp32_path}
    if config.int8:
        copies[ORT_FILES["int8"]] = int8_path
    sizes = {name: Path(src).stat().st_size for name, src in copies.items()}
    info: dict[str, Any] = {"model": shape}
    if hf:
        documents = genai_files(cfg, None, ORT_FILES["fp32"], hf_tokenizer=tokenizer)
        kept = sorted(name for name in tokenizer.files if "/" not in name)
        info.update(tokenizer="hf", tokenizer_files=kept, bos_id=tokenizer.bos_id)
        if tokenizer.chat_template is not None:  # the edge runtime frames prompts with it, without jinja2
            info["chat_frame"] = list(tokenizer.chat_frame(**(CHAT_KWARGS if style == CHAT else {})))
    else:
        documents = genai_files(cfg, gpt2_files, ORT_FILES["fp32"])
        copies.update({"encoder.json": gpt2_files[0], "vocab.bpe": gpt2_files[1]})
        info["tokenizer"] = "gpt2"
    info.update(
        eos_id=eos_ids[0],
        eos_ids=eos_ids,
        pad_id=pad_id,
        prompt=prompt_template(style),
        chat_template=tokenizer.chat_template is not None,
        opset=opset,
        source_checkpoint_sha256=ckpt_sha,
        quality=quality,
    )
    documents["card.md"] = model_card(info, sizes)
    bundle = write_bundle(out_dir / BUNDLE_DIR, LM, copies, documents, info)
    report = {
        "checkpoint": str(path),
        "checkpoint_sha256": ckpt_sha,
        "kind": LM,
        "family": cfg.family,
        "bundle": str(bundle),
        "data": str(data_dir) if data_dir is not None else None,
        "opset": opset,
        "quality": quality,
        "sizes_bytes": {"torch_checkpoint": path.stat().st_size, **sizes},
    }
    shutil.rmtree(work)
    write_json_atomic(out_dir / REPORT, report)
    metrics: dict[str, Any] = {**parity}
    if rows:
        metrics["perplexity"] = quality["perplexity"]
    if config.int8:
        metrics["int8_perplexity_increase_pct"] = quality["int8_perplexity_increase_pct"]
        metrics["int8_token_agreement"] = quality["int8_agreement"]["token_agreement"]
    return Built([REPORT] + [f"{BUNDLE_DIR}/{name}" for name in sorted(p.name for p in bundle.iterdir())], metrics)


def model_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model of an LM export (PyTorch fp32, ONNX fp32, ONNX int8): file MB, validation perplexity (None when no
    data was given), tokens/s."""
    q, sizes = report["quality"], report["sizes_bytes"]
    ppl = q.get("perplexity", {})
    return [
        {
            "model": model,
            "file_mb": round(sizes[file] / 1e6, 1),
            "perplexity": round(ppl[model], 4) if model in ppl else None,
            "tokens_per_s": round(q["tokens_per_second"][model], 1) if model in q["tokens_per_second"] else None,
        }
        for model, file in MODEL_FILES.items()
        if file in sizes
    ]


def model_card(info: dict[str, Any], sizes: dict[str, int]) -> str:
    """The bundle's card: what it is, how it was checked, how to run it."""
    q, m = info["quality"], info["model"]
    heads = f"{m['n_heads']} heads" + (f" ({m['kv_heads']} key/value heads)" if m["kv_heads"] != m["n_heads"] else "")
    prompt = (
        info["prompt"]["style"]
        if info["prompt"]
        else "the model's chat template"
        if info["chat_template"]
        else "none (plain text)"
    )
    vocabulary = "GPT-2's BPE" if info["tokenizer"] == "gpt2" else "the model's own tokenizer (tokenizer.json)"
    lines = [
        "# gptflow language-model bundle",
        "",
        f"{FAMILY_NAMES[m['family']]} architecture: {m['n_layers']} layers, {heads}, width {m['emb_dim']}, "
        f"head size {m['head_dim']}, {m['positions']} positions, context {m['context_length']}, vocabulary "
        f"{m['vocab_size']} ({vocabulary}). Prompt format: {prompt}; end tokens {info['eos_ids']}. "
        f"Source checkpoint sha256 `{info['source_checkpoint_sha256']}`; ONNX opset {info['opset']}.",
        "",
        "| file | MB |",
        "|---|---|",
        *[f"| {name} | {size / 1e6:.1f} |" for name, size in sizes.items()],
        "",
    ]
    if "perplexity" in q:
        lines.append(
            f"Perplexity over {q['perplexity_rows']} validation rows: "
            + ", ".join(f"{name} {value:.4f}" for name, value in q["perplexity"].items())
            + "."
        )
    lines.append(
        f"fp32 ONNX vs PyTorch, max |logit diff|: prompt pass {q['parity']['prompt_max_abs_logit_diff']:.2e}, "
        f"{q['parity']['steps']} cached steps {q['parity']['steps_max_abs_logit_diff']:.2e}."
    )
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
