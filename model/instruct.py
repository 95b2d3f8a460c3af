"""Instruction fine-tuning (the book's chapter 7): prompt formats, collation, the training loop with
checkpoint/resume, and resumable generation of the test-split responses.

Outputs of `finetune` in `out_dir`: `last.pt` (full training state, resumable), `model.pt` (weights plus the
prompt style and config, what `generate_responses` reads), `loss_curve.png`, `metrics.json`, a manifest.
`generate_responses` writes `responses/test_responses.json` (the test entries with a `model_response`),
appending each response to `responses/progress.jsonl` first so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gptflow.errors import GptflowError
from gptflow.prompts import RESPONSE_MARKERS, Style, clean_response, format_example, format_prompt
from gptflow.settings import Settings
from gptflow.storage import (
    completed_manifest,
    read_json,
    sha256_file,
    sha256_json,
    source_digest,
    write_json_atomic,
    write_manifest,
)
from gptflow.tokenizer import EOT_ID
from model.checkpoint import load_checkpoint, load_model, save_model
from model.fused_loss import IGNORE_INDEX
from model.generate import generate, trim_at_eos
from model.gpt import GPTModel
from model.init import INIT_HELP, build_init_model, init_file, init_label, validate_init
from model.pretrain import lm_loss, plot_loss_curve
from model.training import (
    TrainState,
    autocast,
    build_optimizer,
    build_scheduler,
    check_finite,
    eval_mode,
    load_training_checkpoint,
    save_training_checkpoint,
    set_threads,
)

# The code that makes this stage's outputs: part of its cache key (see gptflow.storage.source_digest).
CODE = source_digest(__name__, "model.gpt", "model.pretrain", "model.fused_loss", "model.training", "model.init",
                     "model.generate", "gptflow.prompts")

log = logging.getLogger(__name__)

STAGE = "instruct"
RESPONSES_STAGE = "instruct-responses"
CHECKPOINT = "last.pt"
MODEL = "model.pt"
PLOT = "loss_curve.png"
METRICS = "metrics.json"
RESPONSES_DIR = "responses"
RESPONSES = "test_responses.json"
PROGRESS = "progress.jsonl"
RESPONSE_KEY = "model_response"

class InstructError(GptflowError, ValueError):
    """Instruction data, init source or resume state is unusable."""


# --- prompts (formats in gptflow.prompts) -----------------------------------------------------------

def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Entry text is data: a literal `<|endoftext|>` in it is encoded as plain text, not as token 50256."""
    return tokenizer.encode(text, disallowed_special=())


def encode_entries(entries: list[dict[str, str]], tokenizer: Any, style: Style) -> list[tuple[list[int], int]]:
    """(token ids of prompt + output, number of prompt tokens) per entry."""
    encoded = []
    for entry in entries:
        prompt = encode_text(tokenizer, format_prompt(entry, style))
        ids = encode_text(tokenizer, format_example(entry, style))
        n_prompt = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        encoded.append((ids, n_prompt))  # the prompt is a token prefix of the example (a marker line ends it)
    return encoded


# --- collation -------------------------------------------------------------------------------------------

def collate(
    batch: list[list[int]],
    prompt_lengths: list[int] | None = None,
    *,
    pad_id: int = EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's collate: append one `pad_id` (end of text) to each sequence, pad with `pad_id` to the
    longest + 1, inputs = tokens[:-1], targets = tokens[1:], every padding target after the end-of-text one
    set to `ignore_index`, then truncate to `max_length`. With `prompt_lengths` the targets that are prompt
    tokens are also set to `ignore_index`, so the loss covers only the response (and its end of text).
    Padding is located by position, so a genuine 50256 inside a text is still a target."""
    width = max(len(ids) for ids in batch) + 1
    inputs = torch.full((len(batch), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width - 1), ignore_index, dtype=torch.long)
    for row, ids in enumerate(batch):
        padded = torch.tensor(list(ids) + [pad_id] * (width - len(ids)), dtype=torch.long)
        inputs[row] = padded[:-1]
        targets[row, :len(ids)] = padded[1:len(ids) + 1]  # the text's next tokens and its end of text
        if prompt_lengths is not None:
            targets[row, :max(prompt_lengths[row] - 1, 0)] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


# --- config ----------------------------------------------------------------------------------------------

class InstructConfig(BaseModel):
    """Every knob of an instruction fine-tune and its test responses (also the flow's parameters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    init: str = Field(default="random", description=INIT_HELP)
    preset: str = Field(default="mini", description="model shape for init=random")
    context_length: int | None = Field(default=None, gt=1, description="override the preset's (random init)")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    style: Style = Field(default="alpaca", description="prompt format: alpaca (the book) or phi3")
    mask_prompt: bool = Field(default=False, description="loss on the response tokens only")
    max_length: int | None = Field(default=None, gt=1, description="truncate examples (default: model context)")
    epochs: int = Field(default=2, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="stop after this many steps (quick runs)")
    batch_size: int = Field(default=8, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=1.0, ge=0, le=1, description="1.0: constant lr after warmup (the book)")
    grad_clip: float | None = Field(default=None, gt=0)
    seed: int = 123
    bf16: bool = Field(default=True, description="bf16 autocast for training and evaluation")
    threads: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=5, gt=0)
    eval_every: int = Field(default=50, gt=0)
    eval_batches: int | None = Field(default=5, gt=0, description="validation batches per evaluation (None: all)")
    checkpoint_every: int = Field(default=100, gt=0)
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0, description="0: greedy (the book)")
    top_k: int | None = Field(default=None, gt=0)
    max_test_entries: int | None = Field(default=None, gt=0, description="answer only the first N test entries")
    sample_rows: int = Field(default=5, ge=0, description="sample responses shown in the artifacts")

    @field_validator("init")
    @classmethod
    def _init_kind(cls, value: str) -> str:
        return validate_init(value)

    def resume_key(self) -> dict[str, Any]:
        """Fields that define the trained model (cadence, threads and generation settings may change)."""
        loose = {"threads", "log_every", "eval_every", "eval_batches", "checkpoint_every", "max_new_tokens",
                 "temperature", "top_k", "max_test_entries", "sample_rows"}
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in loose}

    def generation_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("max_new_tokens", "temperature", "top_k", "max_test_entries", "seed")}

    def init_label(self) -> str:
        """Short name of the starting point, for folder names."""
        return init_label(self.init, self.preset)


# --- data ------------------------------------------------------------------------------------------------

def load_split(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise InstructError(f"{path} does not exist; run `gptflow data instructions` first")
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InstructError(f"{path}: not a JSON file ({exc})") from None
    bad = [i for i, e in enumerate(data if isinstance(data, list) else [None])
           if not (isinstance(e, dict) and isinstance(e.get("instruction"), str) and isinstance(e.get("output"), str))]
    if not isinstance(data, list) or not data or bad:
        raise InstructError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} string "
                            f"entries" + (f"; entries {bad[:10]} are not" if bad and isinstance(data, list) else ""))
    return data


class Batches:
    """Fixed-size training batches in a seeded order per epoch (the book: shuffle, drop_last). The position
    is the step count, so a resumed run needs no sampler state."""

    def __init__(self, examples: list[tuple[list[int], int]], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = len(examples) // batch_size
        if self.per_epoch == 0:
            raise InstructError(f"{len(examples)} training entries are fewer than one batch of {batch_size}; "
                                "lower --batch-size")

    def at(self, step: int) -> list[tuple[list[int], int]]:
        epoch, i = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.examples[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]


def batch_tensors(examples: list[tuple[list[int], int]], config: InstructConfig,
                  max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [e[0] for e in examples]
    prompts = [e[1] for e in examples] if config.mask_prompt else None
    return collate(ids, prompts, max_length=max_length)


def evaluate(model: GPTModel, examples: list[tuple[list[int], int]], config: InstructConfig, max_length: int,
             max_batches: int | None) -> float:
    """Token-weighted mean loss over the first `max_batches` batches of `examples` (in file order)."""
    total, count = 0.0, 0
    starts = list(range(0, len(examples), config.batch_size))[:max_batches]
    with eval_mode(model), autocast(config.bf16):
        for s in starts:
            x, y = batch_tensors(examples[s:s + config.batch_size], config, max_length)
            n = int((y != IGNORE_INDEX).sum())
            total += lm_loss(model.features(x), model.out_head.weight, y).item() * n
            count += n
    return total / max(count, 1)


# --- training --------------------------------------------------------------------------------------------

@dataclass
class InstructResult:
    out_dir: Path
    checkpoint: Path
    model_path: Path
    plot: Path | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False


def finetune(
    data_dir: str | Path,
    out_dir: str | Path,
    config: InstructConfig | None = None,
    *,
    tokenizer: Any,
    settings: Settings | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
) -> InstructResult:
    """Fine-tune on `data_dir/{train,validation}.json`. A finished run with the same data, init and config is
    reused; an unfinished one resumes from `out_dir/last.pt`. `on_log` receives every train/eval metrics dict."""
    config = config or InstructConfig()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    train_entries = load_split(data_dir / "train.json")
    val_entries = load_split(data_dir / "validation.json")
    init_path = init_file(config.init, settings)
    inputs = {n: sha256_file(data_dir / n) for n in ("train.json", "validation.json")}
    inputs["init"] = sha256_file(init_path) if init_path is not None else "random"
    if resume and (done := completed_manifest(out_dir, inputs, config.resume_key(), code=CODE)) is not None:
        log.info("instruct: reusing %s (same data, init and config)", out_dir)
        metrics = read_json(out_dir / METRICS)
        return InstructResult(out_dir, out_dir / CHECKPOINT, out_dir / MODEL, out_dir / PLOT, done["metrics"],
                              metrics["history"], reused=True)

    model = build_init_model(config.init, config.preset, dropout=config.dropout, seed=config.seed,
                             context_length=config.context_length, settings=settings).train()
    ctx = model.cfg.context_length
    max_length = config.max_length or ctx
    if max_length > ctx:
        raise InstructError(f"max_length {max_length} exceeds the model's context length {ctx}")
    set_threads(config.threads)
    train = Batches(encode_entries(train_entries, tokenizer, config.style), config.batch_size, config.seed)
    val = encode_entries(val_entries, tokenizer, config.style)
    total_steps = train.per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas)
    scheduler = build_scheduler(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    state = TrainState()
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.is_file():
        stored = load_checkpoint(ckpt_path)
        if stored.get("instruct_config") != config.resume_key() or stored.get("inputs") != inputs:
            raise InstructError(f"{ckpt_path} was written by a run with other data or config; pass another output "
                                "folder, or --no-resume to start over")
        state, _ = load_training_checkpoint(ckpt_path, model, optimizer, scheduler)
        log.info("instruct: resumed from %s at step %d", ckpt_path, state.step)
    out_dir.mkdir(parents=True, exist_ok=True)

    def emit(metrics: dict[str, Any]) -> None:
        state.history.append(metrics)
        if on_log is not None:
            on_log(dict(metrics))

    def checkpoint() -> None:
        save_training_checkpoint(ckpt_path, model, optimizer, scheduler, state, style=config.style,
                                 instruct_config=config.resume_key(), inputs=inputs)

    model.train()
    t_last, tokens_last, losses = time.perf_counter(), state.tokens_seen, []
    while state.step < total_steps:
        x, y = batch_tensors(train.at(state.step), config, max_length)
        with autocast(config.bf16):
            loss = lm_loss(model.features(x), model.out_head.weight, y)
        check_finite(loss, state.step + 1, f"training (last good checkpoint: "
                                           f"{ckpt_path if ckpt_path.is_file() else 'none yet'})")
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        state.tokens_seen += x.numel()
        losses.append(loss.item())
        if state.step % config.log_every == 0 or state.step == total_steps:
            now = time.perf_counter()
            tps = (state.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, state.tokens_seen
            emit({"kind": "train", "step": state.step, "epoch": state.step / train.per_epoch,
                  "loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
                  "tokens_seen": state.tokens_seen, "tokens_per_s": tps})
            losses = []
        if state.step % config.eval_every == 0 or state.step == total_steps:
            last = state.step == total_steps
            val_loss = evaluate(model, val, config, max_length, None if last else config.eval_batches)
            check_finite(torch.tensor(val_loss), state.step, "validation")
            state.best_val_loss = min(state.best_val_loss, val_loss)
            emit({"kind": "eval", "step": state.step, "val_loss": val_loss, "tokens_seen": state.tokens_seen})
            t_last = time.perf_counter()
        if state.step % config.checkpoint_every == 0 or state.step == total_steps:
            checkpoint()

    trains = [h for h in state.history if h["kind"] == "train"]
    evals = [h for h in state.history if h["kind"] == "eval"]
    final = {"steps": state.step, "epochs": state.step / train.per_epoch, "tokens_seen": state.tokens_seen,
             "train_loss": trains[-1]["loss"] if trains else None,
             "val_loss": evals[-1]["val_loss"] if evals else None,
             "best_val_loss": state.best_val_loss, "params": model.num_params(), "style": config.style}
    save_model(out_dir / MODEL, model, style=config.style, instruct_config=config.model_dump(mode="json"),
               metrics=final)
    plot = plot_loss_curve(state.history, out_dir / PLOT, title=f"instruction fine-tuning ({config.style}, "
                           f"{config.init_label()})")
    write_json_atomic(out_dir / METRICS, {"final": final, "history": state.history})
    write_manifest(out_dir, stage=STAGE, inputs=inputs, config=config.resume_key(),
                   outputs=[CHECKPOINT, MODEL, PLOT, METRICS], metrics=final, code=CODE)
    return InstructResult(out_dir, ckpt_path, out_dir / MODEL, plot, final, state.history)


# --- responses -------------------------------------------------------------------------------------------

def load_instruct_model(path: str | Path) -> tuple[GPTModel, Style]:
    """A fine-tuned model and the prompt style it was trained with (recorded in its checkpoint)."""
    model, _ = load_model(path)
    style = load_checkpoint(path).get("style")
    if style not in RESPONSE_MARKERS:
        raise InstructError(f"{path} records no prompt style: not an instruction fine-tune "
                            "(run `gptflow finetune-instructions`)")
    return model.eval(), style


def respond(model: GPTModel, tokenizer: Any, entry: dict[str, str], style: Style,
            config: InstructConfig) -> str:
    """Greedy (or sampled) generation with the KV cache, stopping at end of text; the extracted response."""
    ids = encode_text(tokenizer, format_prompt(entry, style))
    out = generate(model, torch.tensor([ids]), config.max_new_tokens, temperature=config.temperature,
                   top_k=config.top_k, eos_id=EOT_ID, seed=config.seed, use_cache=True)
    new = trim_at_eos(out[0, len(ids):].tolist(), EOT_ID)
    return clean_response(tokenizer.decode(new), style)  # the prompt ends with the marker line


@dataclass
class ResponsesResult:
    path: Path
    n_entries: int
    n_generated: int  # in this call (0 when reused)
    seconds: float
    reused: bool = False


def generate_responses(
    model_path: str | Path,
    test_path: str | Path,
    out_dir: str | Path,
    config: InstructConfig | None = None,
    *,
    tokenizer: Any,
    on_response: Callable[[int, dict[str, Any]], None] | None = None,
) -> ResponsesResult:
    """Answer every test entry; write them with a `model_response` field to `out_dir/test_responses.json`.

    Each response is appended to `progress.jsonl` (with a key of model, test file and generation settings)
    as soon as it is made; a rerun skips the entries already there. `on_response(index, entry)` is called
    after each new one is saved (progress reporting; raising from it interrupts the run)."""
    config = config or InstructConfig()
    model_path, test_path, out_dir = Path(model_path), Path(test_path), Path(out_dir)
    entries = load_split(test_path)[:config.max_test_entries]
    inputs = {"model.pt": sha256_file(model_path), "test.json": sha256_file(test_path)}
    gen = config.generation_key()
    final = out_dir / RESPONSES
    if completed_manifest(out_dir, inputs, gen, code=CODE) is not None:
        return ResponsesResult(final, len(entries), 0, 0.0, reused=True)
    model, style = load_instruct_model(model_path)
    set_threads(config.threads)
    key = sha256_json({"inputs": inputs, "generation": gen})
    done, fresh = _read_progress(out_dir / PROGRESS, key)
    started = time.perf_counter()
    n_new = 0
    with open(out_dir / PROGRESS, "a", encoding="utf-8") as progress:
        if fresh:
            _append(progress, {"key": key})
        for i, entry in enumerate(entries):
            if i in done:
                continue
            done[i] = respond(model, tokenizer, entry, style, config)
            _append(progress, {"index": i, RESPONSE_KEY: done[i]})
            n_new += 1
            if on_response is not None:
                on_response(i, {**entry, RESPONSE_KEY: done[i]})
    write_json_atomic(final, [{**e, RESPONSE_KEY: done[i]} for i, e in enumerate(entries)])
    write_manifest(out_dir, stage=RESPONSES_STAGE, inputs=inputs, config=gen, outputs=[RESPONSES],
                   metrics={"entries": len(entries), "style": style}, code=CODE)
    (out_dir / PROGRESS).unlink()
    return ResponsesResult(final, len(entries), n_new, time.perf_counter() - started)


def _read_progress(path: Path, key: str) -> tuple[dict[int, str], bool]:
    """(responses saved by an earlier run with the same key, whether the file was started afresh). A file of
    another model/test/settings is started over; a line cut short by a crash is dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[int, str] = {}
    good_bytes = 0
    if path.is_file():
        with open(path, "rb") as handle:
            for n, raw in enumerate(handle):
                try:
                    record = json.loads(raw)
                    if not raw.endswith(b"\n") or (n == 0 and record["key"] != key):
                        break
                    if n > 0:
                        done[int(record["index"])] = str(record[RESPONSE_KEY])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    break
                good_bytes += len(raw)
    if good_bytes == 0:
        path.write_bytes(b"")
        return {}, True
    with open(path, "r+b") as handle:
        handle.truncate(good_bytes)
    return done, False


def _append(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def sample_rows(path: Path, n: int, width: int = 200) -> list[dict[str, str]]:
    """The first `n` entries of a responses file, shortened for a table."""
    def short(text: str) -> str:
        return text if len(text) <= width else text[:width - 3] + "..."

    return [{"instruction": short(e["instruction"]), "input": short(e.get("input", "")),
             "output": short(e["output"]), RESPONSE_KEY: short(e[RESPONSE_KEY])} for e in read_json(path)[:n]]
