"""Instruction fine-tuning (the book's chapter 7): prompt formats, collation, the fine-tuning stage (through
model.training) and resumable generation of the test-split responses.

The model reads text with its own tokenizer (`InitSpec.tokenizer`): GPT-2's BPE, or the Hugging Face tokenizer its
checkpoint keeps. A model whose tokenizer has a chat template is tuned and asked in it (style "chat",
`gptflow.prompts`): the loss covers the assistant's turn only (the output and its end-of-turn token), and responses
stop at any of the model's end tokens. A model without one uses the Alpaca or Phi-3 text prompt, as the book does.

Outputs of `finetune` in its stage folder: `last.pt` (resumable), `model.pt` (weights plus the prompt style and the
model's tokenizer files, what `generate_responses` reads), `metrics.json`, a manifest. `generate_responses` writes
`responses/test_responses.json` (the test entries with a `model_response`), appending each response to
`responses/progress.jsonl` first so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gptflow.errors import GptflowError
from gptflow.journal import Journal
from gptflow.prompts import CHAT, chat_example, chat_prompt, clean_response, format_example, format_prompt, tuning_style
from gptflow.settings import Settings
from gptflow.splits import read_instructions
from gptflow.stage import Built, Decision, Stage
from gptflow.storage import read_json, sha256_bytes, write_json_atomic
from gptflow.tokenizer import EOT_ID
from model import lora
from model.config import GPTConfig
from model.configs import InstructConfig
from model.device import autocast, check_fits, resolve_device
from model.distributed import replicated
from model.fused_loss import IGNORE_INDEX
from model.generate import generate, trim_at_eos
from model.gpt import GPTModel
from model.init import text_tokenizer
from model.opener import open_model
from model.pretrain import LMResult, finish_lm_stage, lm_loss, run_lm_stage
from model.training import (
    EpochBatches,
    TrainingCheckpoint,
    eval_mode,
    set_threads,
    train,
)

RESPONSES_DIR = "responses"
RESPONSES = "test_responses.json"
RESPONSE_KEY = "model_response"


class InstructError(GptflowError, ValueError):
    """Instruction data, init source or resume state is unusable."""


# --- prompts (formats in gptflow.prompts) -----------------------------------------------------------


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A text prompt's ids. With GPT-2's BPE (a tiktoken encoding or `GPT2Text`) entry text is data: a literal
    `<|endoftext|>` in it is encoded as plain text, not as token 50256. A Hugging Face tokenizer encodes it as
    transformers' `tokenizer(text)` does (its post-processor's start token included: Llama 3's bos)."""
    encoding = getattr(tokenizer, "encoding", tokenizer)  # GPT2Text wraps tiktoken's encoding
    if hasattr(encoding, "encode_ordinary"):
        return encoding.encode(text, disallowed_special=())
    return tokenizer.encode(text, add_special_tokens=True)


def prompt_ids(tokenizer: Any, entry: dict[str, str], style: str) -> list[int]:
    """The ids a model tuned in `style` is asked with: the chat template's prompt (it writes its special tokens
    itself) or the text prompt up to its response marker line."""
    if style == CHAT:
        return tokenizer.encode(chat_prompt(tokenizer, entry), add_special_tokens=False)
    return encode_text(tokenizer, format_prompt(entry, style))


def encode_entries(entries: list[dict[str, str]], tokenizer: Any, style: str) -> list[tuple[list[int], int]]:
    """(token ids of prompt + output, number of prompt tokens) per entry.

    Text styles: the example's ids; the prompt is a token prefix of them (a marker line ends it). Chat: the
    prompt's ids followed by those of the rest of the render up to and including the first end token (the
    assistant's end of turn; what a template writes after it, such as ChatML's newline, is not learned): the
    training ids start exactly as the prompt `respond` generates from."""
    encoded = []
    for entry in entries:
        if style == CHAT:
            prompt_text, response_text = chat_example(tokenizer, entry)
            prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
            response = tokenizer.encode(response_text, add_special_tokens=False)
            end = next((i for i, t in enumerate(response) if t in tokenizer.eos_ids), None)
            response = response[: end + 1] if end is not None else response + [tokenizer.eos_id]
            encoded.append((prompt + response, len(prompt)))
            continue
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
    end_id: int | None = EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's collate: append one `end_id` (end of text; the book's is its pad token 50256) to each sequence,
    pad with `pad_id` to the longest + 1, inputs = tokens[:-1], targets = tokens[1:], every padding target after
    the end-of-text one set to `ignore_index`, then truncate to `max_length`. With `prompt_lengths` the targets
    that are prompt tokens are also set to `ignore_index`, so the loss covers only the response (and its end of
    text). `end_id` None appends nothing (chat examples end with their end-of-turn token already).
    Padding is located by position, so a genuine 50256 inside a text is still a target."""
    rows = [list(ids) + ([end_id] if end_id is not None else []) for ids in batch]
    width = max(len(r) for r in rows)
    inputs = torch.full((len(batch), max(width - 1, 1)), pad_id, dtype=torch.long)
    targets = torch.full(inputs.shape, ignore_index, dtype=torch.long)
    for row, ids in enumerate(rows):
        n = len(ids) - 1
        if n > 0:
            inputs[row, :n] = torch.tensor(ids[:-1], dtype=torch.long)
            targets[row, :n] = torch.tensor(ids[1:], dtype=torch.long)  # the text's next tokens and its end
        elif ids:
            inputs[row, 0] = ids[0]
        if prompt_lengths is not None:
            targets[row, : max(prompt_lengths[row] - 1, 0)] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs, targets


# --- config ----------------------------------------------------------------------------------------------


# --- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batcher:
    """How examples of a tokenizer and style become (inputs, targets): GPT-2's text prompts as the book (end and
    padding 50256, the prompt masked only with `mask_prompt`); a Hugging Face tokenizer's text prompts end with its
    eos and pad with its pad token; chat examples already end with their end of turn and always mask the prompt
    (the loss covers the assistant's turn only)."""

    max_length: int
    mask_prompt: bool = False
    pad_id: int = EOT_ID
    end_id: int | None = EOT_ID

    @classmethod
    def of(cls, tokenizer: Any, style: str, config: InstructConfig, max_length: int) -> "Batcher":
        tok = text_tokenizer(None, tokenizer)
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        if style == CHAT:
            return cls(max_length, True, pad, None)
        return cls(max_length, config.mask_prompt, pad, tok.eos_id)

    def __call__(self, examples: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [e[1] for e in examples] if self.mask_prompt else None
        return collate(
            [e[0] for e in examples], prompts, pad_id=self.pad_id, end_id=self.end_id, max_length=self.max_length
        )


def evaluate(
    model: GPTModel,
    examples: list[tuple[list[int], int]],
    config: InstructConfig,
    max_length: int,
    max_batches: int | None,
    batcher: Batcher | None = None,
) -> float:
    """Token-weighted mean loss over the first `max_batches` batches of `examples` (in file order), collated by
    `batcher` (default: GPT-2's text prompts, as the book)."""
    total, count = 0.0, 0
    starts = list(range(0, len(examples), config.batch_size))[:max_batches]
    device = next(model.parameters()).device
    batcher = batcher or Batcher(max_length, config.mask_prompt)
    with eval_mode(model), autocast(config.runtime().precision, device):
        for s in starts:
            x, y = (t.to(device) for t in batcher(examples[s : s + config.batch_size]))
            n = int((y != IGNORE_INDEX).sum())
            total += lm_loss(model.features(x), model.head_weight(), y).item() * n
            count += n
    return total / max(count, 1)


# --- training --------------------------------------------------------------------------------------------


def instruct_stage(
    data_dir: str | Path,
    config: InstructConfig,
    out_dir: str | Path | None = None,
    settings: Settings | None = None,
    force: bool = False,
) -> Stage:
    data_dir = Path(data_dir)
    config.check_lora()
    inputs: dict[str, Path | str] = {n: data_dir / n for n in ("train.json", "validation.json")}
    for path in inputs.values():  # a missing split: what to run, before anything is hashed (content: in training)
        if not path.is_file():
            raise InstructError(f"{path} does not exist; run `gptflow data instructions` first")
    inputs["init"] = config.init.stage_input(settings)
    files = config.init.tokenizer_files(settings)  # the style names the folder: chat where the model has a template
    style = tuning_style(config.style, text_tokenizer(files).chat_template if files else None)
    if (shape := config.model_shape()) is not None:  # a model built here (else its file's shape: known on loading)
        cfg = GPTConfig.from_dict(shape)
        tokens = min(config.max_length or cfg.context_length, cfg.context_length)
        check_fits(cfg, config.batch_size, tokens, config.runtime(), f"instruction tuning {config.preset}")
    return Stage.declare(
        "instruct",
        inputs=inputs,
        config=config,
        code=__name__,
        out_dir=out_dir,
        force=force,
        label=f"{data_dir.name}-{config.init.label(config.preset)}-{style}",
    )


@replicated
def finetune(
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    config: InstructConfig | None = None,
    *,
    tokenizer: Any = None,
    settings: Settings | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
    force: bool = False,
) -> LMResult:
    """Fine-tune on `data_dir/{train,validation}.json` into the stage folder (`out_dir`, else named by the stage
    contract, which also decides reuse and resume; `force`: `out_dir` may hold files gptflow did not write).
    Text is read with the starting model's own tokenizer (`tokenizer`, a GPT-2 tiktoken encoding or `GPT2Text`,
    only saves building GPT-2's for a model that has none). `on_log` receives every train/eval record."""
    config = config or InstructConfig()
    stage = instruct_stage(data_dir, config, out_dir, settings, force)
    return run_lm_stage(
        stage, resume, lambda ckpt: _finetune(stage, ckpt, Path(data_dir), config, tokenizer, settings, on_log)
    )


def _finetune(
    stage: Stage,
    checkpoint: TrainingCheckpoint,
    data_dir: Path,
    config: InstructConfig,
    tokenizer: Any,
    settings: Settings | None,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> Built:
    tokenizer = config.init.tokenizer(settings, tokenizer)
    style = tuning_style(config.style, tokenizer.chat_template)
    files = tokenizer.files  # None for GPT-2's BPE
    model = config.init.build(
        config.preset, dropout=config.dropout, seed=config.seed, context_length=config.context_length, settings=settings
    )
    if (spec := config.lora_spec()) is not None:  # adapters on the frozen model
        torch.manual_seed(config.seed)
        lora.apply_lora(model, spec, lora.base_record(config.init, stage.inputs["init"], settings))
    ctx = model.cfg.context_length
    max_length = config.max_length or ctx
    if max_length > ctx:
        raise InstructError(f"max_length {max_length} exceeds the model's context length {ctx}")
    try:
        examples = encode_entries(read_instructions(data_dir / "train.json"), tokenizer, style)
        val = encode_entries(read_instructions(data_dir / "validation.json"), tokenizer, style)
    except GptflowError as exc:
        raise InstructError(f"{config.init}: {exc}") from None
    batcher = Batcher.of(tokenizer, style, config, max_length)
    try:
        order = EpochBatches(len(examples), config.batch_size, config.seed, drop_last=True)
    except ValueError as exc:
        raise InstructError(str(exc)) from None
    steps_per_epoch = max(1, order.per_epoch // (config.grad_accum * config.world_size))
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    def loss(tensors):
        x, y = tensors
        return lm_loss(model.features(x), model.head_weight(), y), {"tokens": x.numel()}

    if files:
        checkpoint.extra = {"tokenizer": files}
    state = train(
        model,
        config,
        stage=stage,
        checkpoint=checkpoint,
        total_steps=total_steps,
        batch=lambda i: batcher([examples[j] for j in order.indices(i)]),
        loss=loss,
        evaluate=lambda final: {
            "val_loss": evaluate(model, val, config, max_length, None if final else config.eval_batches, batcher)
        },
        steps_per_epoch=steps_per_epoch,
        on_log=on_log,
    )
    return finish_lm_stage(
        stage, model, state, data_dir=data_dir, tokenizer=files, epochs=state.step / steps_per_epoch, style=style
    )


# --- responses -------------------------------------------------------------------------------------------


def respond(model: GPTModel, tokenizer: Any, entry: dict[str, str], style: str, config: InstructConfig) -> str:
    """Greedy (or sampled) generation with the KV cache, stopping at any of the model's end tokens (GPT-2: end of
    text; a chat model: its end of turn too); the extracted response."""
    tok = text_tokenizer(None, tokenizer)
    ids = prompt_ids(tok, entry, style)
    ends = list(tok.eos_ids)
    out = generate(
        model,
        torch.tensor([ids], device=next(model.parameters()).device),
        config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        eos_id=ends,
        seed=config.seed,
        use_cache=True,
    )
    new = trim_at_eos(out[0, len(ids) :].tolist(), ends)
    text = tok.decode(new, skip_special_tokens=True) if style == CHAT else tok.decode(new)
    return clean_response(text, style)  # the prompt ends with the marker line, or the template's assistant header


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
    out_dir: str | Path | None = None,
    config: InstructConfig | None = None,
    *,
    tokenizer: Any = None,
    on_response: Callable[[int, dict[str, Any]], None] | None = None,
) -> ResponsesResult:
    """Answer every test entry; write them with a `model_response` field to `test_responses.json` in `out_dir`
    (default: `responses/` beside the model). The model is asked in the style it was tuned in, with its own
    tokenizer (`tokenizer`: GPT-2's, for a model that keeps none); the manifest records the style ("chat": the
    model's chat template, whose sha256 it records too). The entries keep their instruction, input and output, so
    the judge's prompt is the same whatever the style.

    Each response goes to the stage's journal (`gptflow.stage.Journal`, `progress.jsonl`) as soon as it is made; a
    rerun that the stage contract resumes skips the entries already there. `on_response(index, entry)` is called
    after each new one is saved (progress reporting; raising from it interrupts the run)."""
    config = config or InstructConfig()
    model_path, test_path = Path(model_path), Path(test_path)
    entries = read_instructions(test_path)[: config.max_test_entries]
    stage = Stage.declare(
        "instruct-responses",
        inputs={"model.pt": model_path, "test.json": test_path},
        config=config.generation_key(),
        code=__name__,
        folder=Path(out_dir) if out_dir else model_path.parent / RESPONSES_DIR,
    )
    journal = Journal(stage)

    def build(decision: Decision) -> Built:
        opened = open_model(model_path, ("instruct",), hint=" (fine-tune one with `gptflow finetune-instructions`)")
        model, style = opened.language_model(), opened.style
        tok = text_tokenizer(opened.state.get("tokenizer"), tokenizer)
        recorded: dict[str, Any] = {"style": style}
        if style == CHAT:
            recorded["chat_template_sha256"] = sha256_bytes(tok.chat_template.encode("utf-8"))
        model.to(resolve_device(config.device))  # generation runs in fp32: no precision to decide
        set_threads(config.threads)
        done = {i: str(record[RESPONSE_KEY]) for i, record in journal.begin(decision).items()}
        started, n_new = time.perf_counter(), 0
        for i, entry in enumerate(entries):
            if i in done:
                continue
            done[i] = respond(model, tok, entry, style, config)
            journal.append(i, {RESPONSE_KEY: done[i]})
            n_new += 1
            if on_response is not None:
                on_response(i, {**entry, RESPONSE_KEY: done[i]})
        write_json_atomic(stage.dir / RESPONSES, [{**e, RESPONSE_KEY: done[i]} for i, e in enumerate(entries)])
        return Built([RESPONSES], {"entries": len(entries), **recorded}, (n_new, time.perf_counter() - started))

    result = stage.run(build, checkpoint=journal.stored_key)
    if result.reused:
        return ResponsesResult(stage.dir / RESPONSES, len(entries), 0, 0.0, reused=True)
    journal.remove()
    return ResponsesResult(stage.dir / RESPONSES, len(entries), *result.value)


def sample_rows(path: Path, n: int, width: int = 200) -> list[dict[str, str]]:
    """The first `n` entries of a responses file, shortened for a table."""

    def short(text: str) -> str:
        return text if len(text) <= width else text[: width - 3] + "..."

    return [
        {
            "instruction": short(e["instruction"]),
            "input": short(e.get("input", "")),
            "output": short(e["output"]),
            RESPONSE_KEY: short(e[RESPONSE_KEY]),
        }
        for e in read_json(path)[:n]
    ]
