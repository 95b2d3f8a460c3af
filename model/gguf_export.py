"""`gptflow export MODEL --format gguf`: a language model of any family as a GGUF bundle for llama.cpp and Ollama.

The bundle (`bundle/` of the stage folder) holds `model.gguf` (`model.gguf_file`), the `Modelfile` that `ollama
create` or `gptflow publish` reads (`gptflow.modelfile`), a card, and the manifest with every file's sha256, as the
ONNX bundles have. The prompt format travels twice: as the GGUF's chat template (the model's own; for a model tuned
in a text format, Alpaca or Phi-3, that format written as a chat template) and as the Modelfile's Go template.
Before the stage certifies the file it reads it back with `gguf`'s reader: every tensor and key the writer meant.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gguf

from edge.runtime import GGUF as GGUF_KIND
from edge.runtime import GGUF_FILE
from gptflow.modelfile import MODELFILE, Modelfile, frame_template
from gptflow.prompts import frame_chat_template, prompt_frame
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import read_json, write_json_atomic
from model.configs import ExportConfig
from model.files import CHECKPOINT_LMS
from model.gguf_file import Vocabulary, gpt2_vocabulary, hf_vocabulary, write_gguf
from model.gpt import GPTModel
from model.init import text_tokenizer
from model.lm_export import FAMILY_NAMES, LM_EXPORT_HINT
from model.onnx_export import BUNDLE_DIR, REPORT, ExportError, write_bundle
from model.opener import open_model


def export_gguf(
    checkpoint: str | Path,
    out_dir: str | Path | None,
    config: ExportConfig,
    *,
    tokenizer_files: tuple[Path, Path] | None = None,
    settings=None,
    resume: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Language-model checkpoint -> GGUF bundle of `config.quant` (f16, q8_0, q4_0) in the stage folder's
    `bundle/`. `tokenizer_files` (GPT-2's encoder.json, vocab.bpe) serve a model that reads GPT-2's vocabulary
    (fetched through the download layer when not given)."""
    opened = open_model(checkpoint, CHECKPOINT_LMS, hint=LM_EXPORT_HINT)
    path = opened.path
    stage = Stage.declare(
        "export",
        inputs={"checkpoint": path},
        config={"format": GGUF_KIND, "quant": config.quant},
        code=__name__,
        label=f"gguf-{path.parent.name}",
        out_dir=out_dir,
        force=force,
    )

    def build(decision: Decision) -> Built:
        files = opened.state.get("tokenizer") if opened.state is not None else None
        tokenizer = text_tokenizer(files, None, settings)
        model = opened.language_model(settings)
        frame = prompt_frame(tokenizer, opened.style)
        if files:
            vocabulary = hf_vocabulary(tokenizer, model.cfg.vocab_size, tokenizer.chat_template)
        else:
            from gptflow.tokenizer import tokenizer_files as fetch_gpt2_files

            encoder_json, vocab_bpe = tokenizer_files or fetch_gpt2_files(settings)
            template = frame_chat_template(*frame) if frame is not None else None
            vocabulary = gpt2_vocabulary(encoder_json, vocab_bpe, model.cfg.vocab_size, template)
        return _export(path, model, tokenizer, vocabulary, frame, opened.style, stage, config)

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}


def _export(
    path: Path,
    model: GPTModel,
    tokenizer: Any,
    vocabulary: Vocabulary,
    frame: tuple[str, str, str] | None,
    style: str | None,
    stage: Stage,
    config: ExportConfig,
) -> Built:
    cfg, out_dir = model.cfg, stage.dir
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    gguf_path = work / GGUF_FILE
    types = write_gguf(model, vocabulary, gguf_path, config.quant, name=f"gptflow {path.parent.name}")
    tensors = check_file(gguf_path, model, vocabulary)
    modelfile = ollama_modelfile(tokenizer, frame, cfg.context_length)
    info = {
        "gguf": GGUF_FILE,
        "quant": config.quant,
        "family": cfg.family,
        "architecture": cfg.family,
        "tensor_types": types,
        "tensors": tensors,
        "pre_tokenizer": vocabulary.pre,
        "prompt_style": style or "",
        "chat_template": vocabulary.chat_template is not None,
        "eos_ids": list(tokenizer.eos_ids),
        "context_length": cfg.context_length,
        "source_checkpoint_sha256": stage.inputs["checkpoint"],
    }
    size = gguf_path.stat().st_size
    documents = {MODELFILE: modelfile.text(), "card.md": gguf_card(cfg, info, modelfile, size)}
    bundle = write_bundle(out_dir / BUNDLE_DIR, GGUF_KIND, {GGUF_FILE: gguf_path}, documents, info)
    shutil.rmtree(work)
    report = {
        "checkpoint": str(path),
        "checkpoint_sha256": stage.inputs["checkpoint"],
        "kind": GGUF_KIND,
        "family": cfg.family,
        "quant": config.quant,
        "bundle": str(bundle),
        "gguf": str(bundle / GGUF_FILE),
        "modelfile": str(bundle / MODELFILE),
        "tensor_types": types,
        "pre_tokenizer": vocabulary.pre,
        "sizes_bytes": {"torch_checkpoint": path.stat().st_size, GGUF_FILE: size},
    }
    write_json_atomic(out_dir / REPORT, report)
    outputs = [REPORT] + [f"{BUNDLE_DIR}/{name}" for name in sorted(p.name for p in bundle.iterdir())]
    return Built(outputs, {"quant": config.quant, "gguf_mb": round(size / 1e6, 2), "tensor_types": types})


def check_file(path: Path, model: GPTModel, vocabulary: Vocabulary) -> int:
    """Read the file back with `gguf`'s reader: the architecture, the widths llama.cpp reads, the vocabulary and a
    tensor for each one written (an ExportError names what differs)."""
    cfg = model.cfg
    reader = gguf.GGUFReader(str(path))
    arch = cfg.family

    def value(key: str) -> Any:
        field = reader.get_field(key)
        if field is None:
            raise ExportError(f"{path}: the written GGUF lacks {key}")
        return field.contents()

    expected = {
        "general.architecture": arch,
        f"{arch}.block_count": cfg.n_layers,
        f"{arch}.embedding_length": cfg.emb_dim,
        f"{arch}.context_length": cfg.context_length,
        f"{arch}.attention.head_count": cfg.n_heads,
        "tokenizer.ggml.pre": vocabulary.pre,
    }
    for key, want in expected.items():
        if value(key) != want:
            raise ExportError(f"{path}: {key} reads back as {value(key)!r}, expected {want!r}")
    if len(value("tokenizer.ggml.tokens")) != cfg.vocab_size:
        raise ExportError(f"{path}: the token list does not hold {cfg.vocab_size} tokens")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or [int(n) for n in embedding.shape] != [cfg.emb_dim, cfg.vocab_size]:
        raise ExportError(f"{path}: token_embd.weight is missing or not {cfg.emb_dim} x {cfg.vocab_size}")
    return len(reader.tensors)


def ollama_modelfile(tokenizer: Any, frame: tuple[str, str, str] | None, context_length: int) -> Modelfile:
    """The Modelfile of a bundle: the prompt frame as Ollama's template, the end tokens as stops, the context
    length, and the model's own sampling defaults (its generation_config.json), else greedy as `gptflow generate`."""
    template = frame_template(*frame) if frame is not None else "{{ .Prompt }}"
    stops = tuple(dict.fromkeys(tokenizer.decode([i]) for i in tokenizer.eos_ids))
    parameters: dict[str, int | float] = {"num_ctx": context_length}
    generation = tokenizer.generation_config
    if generation.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            if isinstance(generation.get(key), (int, float)):
                parameters[key] = generation[key]
    else:
        parameters["temperature"] = 0
    return Modelfile(GGUF_FILE, template, stops, parameters)


def gguf_card(cfg, info: dict[str, Any], modelfile: Modelfile, size: int) -> str:
    """The bundle's card: what it is and how to run it."""
    types = ", ".join(f"{n} {name}" for name, n in sorted(info["tensor_types"].items()))
    prompt = info["prompt_style"] or ("the model's chat template" if info["chat_template"] else "none (plain text)")
    return "\n".join(
        [
            "# gptflow GGUF bundle",
            "",
            f"{FAMILY_NAMES[cfg.family]} architecture (llama.cpp `{info['architecture']}`): {cfg.n_layers} layers, "
            f"{cfg.n_heads} heads ({cfg.kv_heads} key/value), width {cfg.emb_dim}, context {cfg.context_length}, "
            f"vocabulary {cfg.vocab_size} (pre-tokenizer `{info['pre_tokenizer']}`). {info['quant'].upper()}: "
            f"{size / 1e6:.1f} MB, {info['tensors']} tensors ({types}). Prompt format: {prompt}; stops "
            f"{list(modelfile.stops)}. Source checkpoint sha256 `{info['source_checkpoint_sha256']}`.",
            "",
            "Run it with llama.cpp: `llama-cli -m model.gguf` (or `llama-server -m model.gguf --jinja`); with "
            "Ollama: `ollama create NAME -f Modelfile` in this folder, or `gptflow publish NAME BUNDLE`, then "
            "`ollama run NAME`.",
            "",
        ]
    )
