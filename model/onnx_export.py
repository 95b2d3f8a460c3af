"""ONNX export of a classifier (dynamo exporter, dynamic batch and sequence), parity checks, the edge bundle.

Only what the classifier computes is exported: token and position embeddings (or the rotary positions of Llama and
Qwen3, computed in the graph), blocks, final norm, gather of the last real token, the class head. The LM head is
not in the classifier at all (a tied LM head exported beside the embedding is a second vocab x emb matrix: see
bench/edge.py for the size it costs).

A classifier reads text with its backbone's tokenizer: GPT-2's BPE (the bundle ships encoder.json and vocab.bpe,
manifest `tokenizer: "gpt2"`), or the model's own Hugging Face tokenizer that its checkpoint keeps (the bundle ships
those files, manifest `tokenizer: "hf"` and `tokenizer_files`, as the LM bundle does), and pads with its `pad_id`.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from edge.runtime import BUNDLE_FORMAT, BUNDLE_MANIFEST, CLASSIFIER, ORT_FILES, run_session, session
from edge.text import PAD_ID
from gptflow.errors import GptflowError
from gptflow.gates import reaches, within
from gptflow.markdown import markdown_table
from gptflow.splits import read_labelled, read_labels
from gptflow.stage import Built, Stage
from gptflow.storage import atomic_dir, atomic_path, read_json, sha256_file, write_json_atomic, write_text_atomic
from model.classifier import ClassifierError, SequenceClassifier, encode_split, predict_logits
from model.configs import ExportConfig
from model.device import resolve_device
from model.files import CLASSIFIERS
from model.opener import open_model
from model.quantize import check_accuracy_gate, quantize_onnx, quantize_torch_dynamic

log = logging.getLogger(__name__)

MIN_OPSET = 17
# Opset 23 has an Attention op: the exporter writes scaled_dot_product_attention as one node instead of ~10
# (matmuls, mask, softmax, transposes), which onnxruntime runs as one kernel (docs/benchmarks.md).
EXPORT_OPSET = 23
MAX_BATCH = 4096
PARITY_ATOL = 1e-4  # fp32 ONNX vs torch, max |logit difference|
BUNDLE_DIR = "bundle"
# The models an export compares -> their key in the report's `sizes_bytes`.
MODEL_FILES = {"torch_fp32": "torch_checkpoint", "onnx_fp32": ORT_FILES["fp32"], "onnx_int8": ORT_FILES["int8"]}
REPORT = "export_report.json"


class ExportError(GptflowError):
    """The exported model is invalid or does not reproduce the PyTorch model."""


def export_onnx(model: SequenceClassifier, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write `model` as one self-contained ONNX file (inputs input_ids, attention_mask int64 (batch, seq); output
    logits (batch, n_classes)); `metadata` goes to metadata_props. Checked with onnx.checker."""
    context = model.cfg.context_length
    seq = min(8, context)  # example sizes >= 2: the exporter specializes sizes 0 and 1
    pad_id = getattr(model, "pad_id", PAD_ID)  # an id of the model's vocabulary (GPT-2's 50256 may not be one)
    example = (torch.full((2, seq), pad_id, dtype=torch.long), torch.ones(2, seq, dtype=torch.long))
    batch_dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq_dim = torch.export.Dim("seq", min=1, max=context)
    shapes = {"input_ids": {0: batch_dim, 1: seq_dim}, "attention_mask": {0: batch_dim, 1: seq_dim}}
    return export_graph(model, example, path, ["input_ids", "attention_mask"], ["logits"], shapes, metadata)


def export_graph(
    module: torch.nn.Module,
    example: tuple,
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, Any],
    metadata: dict[str, str],
    axis_names: dict[str, dict[int, str]] | None = None,
) -> Path:
    """`module` as one self-contained ONNX file (dynamo exporter, opset EXPORT_OPSET), written atomically and
    checked with onnx.checker; `metadata` goes to metadata_props. `axis_names` (graph input/output name -> axis ->
    name) names dynamic axes the exporter leaves as generated symbols or expressions (`s53`, `past + seq`)."""
    path = Path(path)
    module = module.eval()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
        onnx_path = tmp.with_suffix(".onnx")
        try:
            torch.onnx.export(
                module,
                example,
                onnx_path,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                dynamo=True,
                opset_version=EXPORT_OPSET,
                verbose=False,
            )
            proto = onnx.load(onnx_path)
        finally:
            onnx_path.unlink(missing_ok=True)
        opset = onnx_opset(proto)
        if opset < MIN_OPSET:
            raise ExportError(f"the exporter wrote opset {opset}; the edge runtime needs >= {MIN_OPSET}")
        meta = {**metadata, "opset": str(opset)}
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        for value in [*proto.graph.input, *proto.graph.output]:
            for axis, name in (axis_names or {}).get(value.name, {}).items():
                value.type.tensor_type.shape.dim[axis].dim_param = name
        onnx.save(proto, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def onnx_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def model_metadata(
    labels: dict[str, int],
    max_length: int,
    source_sha256: str,
    pooling: str,
    tokenizer: str = "gpt2",
    pad_id: int = PAD_ID,
) -> dict[str, str]:
    """The ONNX file's metadata_props. `tokenizer`: "gpt2" or "hf" (the bundle's manifest names the files)."""
    return {
        "labels": json.dumps(labels, sort_keys=True),
        "tokenizer": tokenizer,
        "max_length": str(max_length),
        "pad_id": str(pad_id),
        "source_checkpoint_sha256": source_sha256,
        "pooling": pooling,
    }


def onnx_logits(
    onnx_path: str | Path, ids: Sequence[Sequence[int]], batch_size: int = 32, pad_id: int = PAD_ID
) -> np.ndarray:
    """Logits of an ONNX classifier over token rows, batched like `predict_logits` (same padding: `pad_id`, the
    classifier's)."""
    return run_session(session(onnx_path), ids, batch_size, pad_id)


def check_parity(
    torch_logits: np.ndarray,
    fp32_logits: np.ndarray,
    int8_logits: np.ndarray | None,
    what: str,
    max_int8_drop: float = 1.0,
) -> dict[str, Any]:
    """fp32 ONNX must match torch (max |diff| <= 1e-4, same predictions); int8 predictions may differ from fp32 on
    at most `max_int8_drop` percent of the messages (the setting that also bounds the int8 accuracy drop, in
    points). NaN or infinite logits fail every check. Returns the measured figures; raises ExportError otherwise."""
    diff = float(np.abs(torch_logits - fp32_logits).max())
    same = int((torch_logits.argmax(1) == fp32_logits.argmax(1)).sum())
    n = len(torch_logits)
    report: dict[str, Any] = {"n": n, "fp32_max_abs_logit_diff": diff, "fp32_prediction_matches": same}
    for name, logits in (("PyTorch", torch_logits), ("fp32 ONNX", fp32_logits), ("int8 ONNX", int8_logits)):
        if logits is not None and not np.isfinite(logits).all():
            bad = int((~np.isfinite(logits)).any(axis=1).sum())
            raise ExportError(f"{what}: the {name} model gives NaN or infinite logits for {bad} of {n} messages")
    if not within(diff, PARITY_ATOL) or same != n:
        raise ExportError(
            f"{what}: the fp32 ONNX model does not reproduce PyTorch: max |logit diff| {diff:.3g} "
            f"(allowed {PARITY_ATOL:g}), {n - same} of {n} predictions differ"
        )
    if int8_logits is not None:
        agreement = float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean())
        report["int8_agreement"] = agreement
        if not reaches(100 * agreement, 100 - max_int8_drop):
            raise ExportError(
                f"{what}: int8 ONNX predictions agree with fp32 on {100 * agreement:.2f}% of messages "
                f"(required {max(0.0, 100 - max_int8_drop):g}% by --max-int8-drop {max_int8_drop:g})"
            )
    return report


def write_bundle(
    out_dir: str | Path, kind: str, copies: dict[str, Path], documents: dict[str, Any], info: dict[str, Any]
) -> Path:
    """An edge bundle of `kind`: the files of `copies` (bundle name -> source path), `documents` (name -> JSON
    value, or text for a str) and a manifest with every file's sha256 plus `info`. Built in a temporary
    folder and renamed into place, so a bundle is never half-written."""
    with atomic_dir(out_dir) as tmp:
        for name, source in copies.items():
            shutil.copyfile(source, tmp / name)
        for name, value in documents.items():
            if isinstance(value, str):
                write_text_atomic(tmp / name, value)
            else:
                write_json_atomic(tmp / name, value)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        write_json_atomic(tmp / BUNDLE_MANIFEST, {"format": BUNDLE_FORMAT, "kind": kind, "files": files, **info})
    return Path(out_dir)


def export_classifier(
    checkpoint: str | Path,
    data_dir: str | Path,
    out_dir: str | Path | None,
    config: ExportConfig,
    *,
    tokenizer: Any = None,
    tokenizer_files: tuple[Path, Path] | None = None,
    settings=None,
    resume: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Classifier checkpoint -> ONNX fp32 (+ int8), parity on the whole test split, int8 gate, edge bundle in
    `bundle/`, report and manifest in the stage folder (`out_dir`, else named by the stage contract). Raises
    ExportError / QuantizationGateError loudly.

    The test split is read with the classifier's own tokenizer: the Hugging Face one its checkpoint keeps (shipped in
    the bundle), else GPT-2's BPE (`tokenizer`, a tiktoken encoding, and `tokenizer_files` = encoder.json,
    vocab.bpe, which the bundle ships; fetched through the download layer when not given and needed)."""
    loaded = open_model(checkpoint, CLASSIFIERS).classifier()
    data_dir = Path(data_dir)
    labels = read_labels(data_dir)
    if labels != loaded.labels:
        raise ClassifierError(f"{data_dir}/labels.json {labels} differs from the checkpoint's labels {loaded.labels}")
    stage = Stage.declare(
        "export",
        inputs={"checkpoint": loaded.path, "test.csv": data_dir / "test.csv"},
        config=config.identity(CLASSIFIER),
        code=__name__,
        label=loaded.path.parent.name,
        out_dir=out_dir,
        force=force,
    )

    def build(decision) -> Built:
        text = loaded.tokenizer(tokenizer, settings)  # GPT2Text, or the checkpoint's HFTokenizer
        gpt2_files = None
        if not loaded.tokenizer_files:
            from gptflow.tokenizer import tokenizer_files as fetch_gpt2_files

            gpt2_files = tokenizer_files or fetch_gpt2_files(settings)
        return _export(loaded, stage, data_dir, config, text, gpt2_files)

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}


def _export(
    loaded, stage: Stage, data_dir: Path, config: ExportConfig, tokenizer, gpt2_files: tuple[Path, Path] | None
) -> Built:
    """`tokenizer`: the classifier's (`LoadedClassifier.tokenizer`); `gpt2_files`: GPT-2's encoder.json and vocab.bpe
    for a classifier that reads GPT-2's vocabulary, None for one with its own tokenizer (whose files it keeps)."""
    out_dir, ckpt_sha = stage.dir, stage.inputs["checkpoint"]
    hf = gpt2_files is None
    pad_id = loaded.model.pad_id
    vocab = loaded.model.cfg.vocab_size
    test = encode_split(read_labelled(data_dir / "test.csv", loaded.labels), tokenizer, loaded.max_length)
    outside = sorted(i for i in {pad_id}.union(*test.ids) if not 0 <= i < vocab)
    if outside:
        raise ExportError(
            f"export of {loaded.path}: its tokenizer gives ids {outside[:5]} outside the model's vocabulary of "
            f"{vocab}: the checkpoint's tokenizer and weights do not belong together; fine-tune it again"
        )
    y = np.asarray(test.labels)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = work / ORT_FILES["fp32"], work / ORT_FILES["int8"]
    kind = "hf" if hf else "gpt2"
    meta = model_metadata(loaded.labels, loaded.max_length, ckpt_sha, loaded.model.pooling, kind, pad_id)
    export_onnx(loaded.model, fp32_path, meta)

    torch_fp32 = predict_logits(loaded.model.to(resolve_device(config.device)), test.ids, config.batch_size)
    loaded.model.cpu()  # dynamic int8 quantization is CPU-only
    onnx_fp32 = onnx_logits(fp32_path, test.ids, config.batch_size, pad_id)
    onnx_int8 = None
    accuracy = {"torch_fp32": _acc(torch_fp32, y), "onnx_fp32": _acc(onnx_fp32, y)}
    if config.int8:
        quantize_onnx(fp32_path, int8_path, config.onnx_int8_ops)
        onnx_int8 = onnx_logits(int8_path, test.ids, config.batch_size, pad_id)
        torch_int8 = predict_logits(quantize_torch_dynamic(loaded.model), test.ids, config.batch_size)
        accuracy |= {"torch_int8": _acc(torch_int8, y), "onnx_int8": _acc(onnx_int8, y)}
    parity = check_parity(torch_fp32, onnx_fp32, onnx_int8, f"export of {loaded.path}", config.max_int8_drop)
    report: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "checkpoint_sha256": ckpt_sha,
        "test_n": len(y),
        "accuracy": accuracy,
        "parity": parity,
        "opset": onnx_opset(onnx.load(fp32_path)),
    }
    if config.int8:
        report["int8_drop_points"] = check_accuracy_gate(
            accuracy["onnx_fp32"], accuracy["onnx_int8"], config.max_int8_drop, f"ONNX int8 of {loaded.path}"
        )
    if loaded.members:
        report["members"] = loaded.members
    # The tokenizer as the LM bundle carries it (model.lm_export): GPT-2's two files, or the model's own files.
    copies = {ORT_FILES["fp32"]: fp32_path}
    tokenizer_info: dict[str, Any] = {"tokenizer": kind}
    documents: dict[str, Any] = {"labels.json": loaded.labels}
    if hf:
        kept = sorted(name for name in tokenizer.files if "/" not in name)
        documents.update({name: tokenizer.files[name] for name in kept})
        tokenizer_info["tokenizer_files"] = kept
    else:
        copies.update({"encoder.json": gpt2_files[0], "vocab.bpe": gpt2_files[1]})
    info = {
        "max_length": loaded.max_length,
        "pad_id": pad_id,
        **tokenizer_info,
        "pooling": loaded.model.pooling,
        "source_checkpoint_sha256": ckpt_sha,
        "opset": report["opset"],
        "test_accuracy": accuracy,
        **({"members": loaded.members} if loaded.members else {}),
    }
    if config.int8:
        copies[ORT_FILES["int8"]] = int8_path
    documents["card.md"] = classifier_card(loaded, report, copies, tokenizer if hf else None)
    bundle = write_bundle(out_dir / BUNDLE_DIR, CLASSIFIER, copies, documents, {"labels": loaded.labels, **info})
    report["bundle"] = str(bundle)
    report["sizes_bytes"] = {
        "torch_checkpoint": loaded.path.stat().st_size,
        **{name: (bundle / name).stat().st_size for name in ORT_FILES.values() if (bundle / name).is_file()},
    }
    shutil.rmtree(work)
    write_json_atomic(out_dir / REPORT, report)
    return Built(
        [REPORT] + [f"{BUNDLE_DIR}/{name}" for name in sorted(p.name for p in bundle.iterdir())],
        {"accuracy": accuracy, **parity},
    )


FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen3": "Qwen3"}


def classifier_card(loaded, report: dict[str, Any], copies: dict[str, Path], hf_tokenizer: Any = None) -> str:
    """The bundle's card: what it is (an ensemble: its members and their accuracies), how it was checked, how to
    run it. `hf_tokenizer`: the model's own tokenizer, which the bundle ships (None: GPT-2's BPE)."""
    cfg, parity = loaded.model.cfg, report["parity"]
    what = f"an ensemble of {len(loaded.members)} classifiers" if loaded.members else "a classifier"
    family = FAMILY_NAMES.get(cfg.family, cfg.family)
    vocabulary = (
        ""
        if hf_tokenizer is None
        else f"; vocabulary {cfg.vocab_size}, the model's own tokenizer (tokenizer.json), padding with id "
        f"{loaded.model.pad_id}"
    )
    lines = [
        "# gptflow classifier bundle",
        "",
        f"{what.capitalize()} on a {family} architecture backbone ({cfg.n_layers} layers, {cfg.n_heads} heads, width "
        f"{cfg.emb_dim}, context {cfg.context_length}{vocabulary}); labels {', '.join(loaded.labels)}; texts truncated "
        f"to {loaded.max_length} tokens; pooling {loaded.model.pooling}. Source checkpoint sha256 "
        f"`{report['checkpoint_sha256']}`; ONNX opset {report['opset']}.",
    ]
    if loaded.members:
        lines += [
            "",
            "One ONNX graph runs every member and returns the log of their mean class probability.",
            "",
            *markdown_table(
                [
                    {
                        "member": Path(m["checkpoint"]).parent.name,
                        "sha256": f"`{m['sha256'][:12]}`",
                        **{f"{split} accuracy": f"{100 * a:.2f}%" for split, a in m["accuracy"].items()},
                    }
                    for m in loaded.members
                ]
            ),
        ]
    lines += [
        "",
        f"Test accuracy of {what} (n={report['test_n']}):",
        "",
        "| model | test accuracy |",
        "|---|---|",
        *[f"| {name} | {100 * acc:.2f}% |" for name, acc in report["accuracy"].items()],
        "",
        f"fp32 ONNX vs PyTorch: max |logit diff| {parity['fp32_max_abs_logit_diff']:.2e}, "
        f"{parity['fp32_prediction_matches']}/{parity['n']} predictions equal"
        + (f"; int8 agrees with fp32 on {100 * parity['int8_agreement']:.2f}%." if "int8_agreement" in parity else ".")
        + " Files: "
        + ", ".join(f"{name} {Path(path).stat().st_size / 1e6:.1f} MB" for name, path in copies.items())
        + ".",
        "",
        'Run with onnxruntime alone: `python -m edge classify BUNDLE "a message" [--int8]`.',
        "",
    ]
    return "\n".join(lines)


def _acc(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())
