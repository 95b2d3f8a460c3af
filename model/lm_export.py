"""The language model to the edge: one ONNX decoder graph with a KV cache, int8, a measured quality gate, and the
LM bundle that `python -m edge generate` and onnxruntime-genai run.

The decoder serves the prompt pass (empty past) and every decoding step (past of any length) with the input and
output names optimum and onnxruntime-genai use (see edge.lm). The tied LM head is stored once: the exported graph
reads the token embedding through Gather and the head through Transpose + MatMul of the same initializer.

int8 is weight-only, blockwise (onnxruntime's MatMulNBits, 8 bits, symmetric, accuracy level 4): activations are
quantized per row and block inside the kernel, so a token's logits do not depend on the other tokens of the
call, and generation with and without the cache gives the same tokens. Per-tensor dynamic quantization
(MatMulInteger) scales activations over the whole call, which is what makes cached and uncached int8 differ.
onnxruntime's quantizer only takes a MatMul whose weight is an initializer, and its 8-bit Gather is not
supported, so the tied matrix is quantized here once: the head becomes a MatMulNBits over it and the embedding
lookup gathers the same int8 rows and dequantizes them.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edge.lm import Decoder, EdgeGenerator
from edge.runtime import LM, ORT_FILES
from edge.text import EOT_ID, PAD_ID
from gptflow.prompts import format_prompt
from gptflow.splits import read_instructions
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import atomic_path, read_json, write_json_atomic
from model.config import GPTConfig
from model.files import CHECKPOINT_LMS
from model.genai import genai_files
from model.gpt import ConcatCache, GPTModel, mask_positions
from model.instruct import encode_entries, encode_text
from model.onnx_export import BUNDLE_DIR, MODEL_FILES, REPORT, ExportConfig, ExportError, export_graph, write_bundle
from model.opener import open_model
from model.pretrain import load_tokens
from model.quantize import check_perplexity_gate
from model.weights import load_gpt2, save_hf_gpt2

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


# ------------------------------------------------------------------------------------------------ int8


def quantize_decoder(fp32_path: str | Path, int8_path: str | Path, block_size: int = 128) -> Path:
    """Weight-only blockwise int8 of the decoder (module docstring): every MatMul with a weight initializer
    through onnxruntime's MatMulNBits quantizer, then the token embedding (tied head included) here."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise ExportError(f"int8 block size {block_size}: expected a power of two >= 16")
    proto = onnx.load(fp32_path)
    past = next(i for i in proto.graph.input if i.name == "past_key_values.0.key")
    heads, head_dim = (d.dim_value for d in past.type.tensor_type.shape.dim[1::2])
    while block_size > max(16, heads * head_dim):  # a block wider than the rows would only store padding
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
        raise ExportError("the decoder graph has no token-embedding Gather over input_ids; cannot quantize it")
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


# ------------------------------------------------------------------------------------- quality checks


def perplexity(logits_of: Any, rows: Sequence[Sequence[int]]) -> float:
    """exp(mean next-token negative log-likelihood) over every position of every row; `logits_of(row)` gives
    the (T, V) logits of one row."""
    total, count = 0.0, 0
    for row in rows:
        logits = np.asarray(logits_of(row[:-1]), dtype=np.float64)
        z = logits - logits.max(axis=-1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return math.exp(total / count)


@torch.no_grad()
def torch_logits(model: GPTModel, row: Sequence[int]) -> np.ndarray:
    device = next(model.parameters()).device
    return model(torch.tensor([list(row)], device=device))[0].float().cpu().numpy()


@torch.no_grad()
def decoder_parity(model: GPTModel, decoder: Decoder, prompts: Sequence[Sequence[int]], steps: int) -> dict:
    """Max |logit difference| between PyTorch (KV cache) and the ONNX decoder for the prompt pass of a left-padded
    batch (real positions only) and `steps` cached decoding steps that follow PyTorch's greedy tokens."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), PAD_ID, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    steps = min(steps, model.cfg.context_length - width)
    cache = model.new_kv_cache(len(prompts), width + steps)
    new, past, prompt_diff, step_diff = ids, None, 0.0, 0.0
    for step in range(steps + 1):
        t_mask = torch.from_numpy(mask).to(device)
        t_new = torch.from_numpy(new).to(device)
        expected = model(t_new, t_mask, cache, mask_positions(t_mask)[:, -new.shape[1] :]).float().cpu().numpy()
        got, past = decoder.run(new, mask, past)
        diff = np.abs(expected - got)
        if step == 0:
            prompt_diff = float(diff[mask.astype(bool)].max())
        else:
            step_diff = max(step_diff, float(diff.max()))
        new = expected[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return {"prompt_max_abs_logit_diff": prompt_diff, "steps": steps, "steps_max_abs_logit_diff": step_diff}


def teacher_forced_matches(candidate: Decoder, prompt: Sequence[int], expected: Sequence[int]) -> int:
    """How many tokens of `expected` (a continuation of `prompt`) `candidate` picks greedily when given the
    tokens before each one (one pass over prompt + continuation)."""
    logits = candidate.sequence_logits(list(prompt) + list(expected[:-1]))
    return int((logits[len(prompt) - 1 :].argmax(-1) == np.asarray(expected)).sum())


def token_agreement(reference: Decoder, candidate: Decoder, prompts: Sequence[Sequence[int]], n_tokens: int) -> dict:
    """Greedy agreement of `candidate` with `reference`: teacher-forced (at each position of the reference's
    greedy continuation, does the candidate pick the same token) and whole continuations equal."""
    same = total = identical = 0
    for prompt in prompts:
        expected = reference.generate([prompt], n_tokens, eos_id=None)[0]
        same += teacher_forced_matches(candidate, prompt, expected)
        total += len(expected)
        identical += candidate.generate([prompt], n_tokens, eos_id=None)[0] == expected
    return {"token_agreement": same / total, "identical_continuations": identical / len(prompts), "tokens": total}


def tokens_per_second(decoder: Decoder, prompt: Sequence[int], n_tokens: int) -> float:
    started = time.perf_counter()
    new = decoder.generate([prompt], n_tokens, eos_id=None)[0]
    return len(new) / (time.perf_counter() - started)


def bundle_perplexity(bundle: str | Path, data_dir: str | Path, config: ExportConfig | None = None) -> dict[str, Any]:
    """Validation perplexity of an LM bundle as it ships (its int8 decoder when it has one, through onnxruntime)
    on `data_dir`: what the registry compares a challenger and the champion on."""
    config = config or ExportConfig()
    int8 = ORT_FILES["int8"] in read_json(Path(bundle) / "manifest.json").get("files", {})
    generator = EdgeGenerator(bundle, int8=int8)
    style = (generator.manifest.get("prompt") or {}).get("style")
    rows, _ = eval_rows(Path(data_dir), generator.tokenizer, style, generator.context_length, config)
    return {
        "val_perplexity": perplexity(generator.decoder.sequence_logits, rows),
        "n": len(rows),
        "model": "int8" if int8 else "fp32",
    }


# ----------------------------------------------------------------------------------------- evaluation data


def eval_rows(data_dir: Path, tokenizer: Any, style: str | None, context: int, config: ExportConfig) -> tuple:
    """(perplexity rows, agreement prompts) from an instructions data folder (validation.json, test.json) or a
    corpus folder (val.bin). Rows fit the context; prompts leave room for the agreement tokens."""
    limit = config.max_eval_rows
    room = max(1, context - config.agreement_tokens)
    if (data_dir / "validation.json").is_file() and (data_dir / "test.json").is_file():
        style = style or "alpaca"
        val, test = (read_instructions(data_dir / f"{split}.json") for split in ("validation", "test"))
        # encoded as fine-tuning encodes them: the example, then one end-of-text
        rows = [(ids + [EOT_ID])[: context + 1] for ids, _ in encode_entries(val[:limit], tokenizer, style)]
        prompts = [encode_text(tokenizer, format_prompt(e, style))[-room:] for e in test[:limit]]
        return rows, prompts
    if (data_dir / "val.bin").is_file():
        tokens = load_tokens(data_dir / "val.bin")
        n = min(limit or len(tokens), max(1, (len(tokens) - 1) // context))
        rows = [tokens[i * context : i * context + context + 1].tolist() for i in range(n)]
        return rows, [r[: min(32, room)] for r in rows]
    raise ExportError(
        f"{data_dir}: expected an instructions data folder (validation.json, test.json) or a corpus folder "
        "(val.bin) to measure perplexity and int8 agreement; pass --data"
    )


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
    if worst > config.lm_parity_atol:
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


HF_DIR = "hf"


def export_hf(
    checkpoint: str | Path, out_dir: str | Path | None, *, tokenizer_files: tuple[Path, Path], resume: bool = True
) -> dict[str, Any]:
    """Language-model checkpoint -> a Hugging Face GPT-2 folder (`hf/` in the stage folder: config.json,
    model.safetensors, tokenizer files) that transformers loads; read back through our loader and compared."""
    opened = open_model(checkpoint, CHECKPOINT_LMS, hint=LM_EXPORT_HINT)
    path = opened.path
    stage = Stage.declare(
        "export",
        inputs={"checkpoint": path},
        config={"format": "hf"},
        code=__name__,
        label=f"hf-{path.parent.name}",
        out_dir=out_dir,
    )

    def build(decision: Decision) -> Built:
        model, cfg = opened.language_model(), opened.config
        folder = save_hf_gpt2(model, stage.dir / HF_DIR, tokenizer_files=tokenizer_files)
        reloaded, _ = load_gpt2(folder)
        row = [i % cfg.vocab_size for i in range(min(16, cfg.context_length))]
        diff = float(np.abs(torch_logits(model, row) - torch_logits(reloaded, row)).max())
        if diff > 0:
            raise ExportError(f"{folder} does not read back to the same model (max |logit diff| {diff:.3g})")
        report = {"checkpoint": str(path), "kind": "hf", "folder": str(folder), "roundtrip_max_abs_logit_diff": diff}
        write_json_atomic(stage.dir / REPORT, report)
        return Built([REPORT] + [f"{HF_DIR}/{p.name}" for p in sorted(folder.iterdir())], {"roundtrip": diff})

    result = stage.run(build, resume=resume)
    return {**read_json(stage.dir / REPORT), "out_dir": str(stage.dir), "reused": result.reused}
