"""Text generation with an exported language-model bundle: onnxruntime, NumPy and the bundle's tokenizer package
only (tiktoken for GPT-2's vocabulary; tokenizers for a model's own, its chat template rendered by the export).

The bundle's decoder is one ONNX graph for the prompt pass and every decoding step: inputs `input_ids`,
`attention_mask` (past + new tokens, 1 = real), `position_ids` and `past_key_values.{i}.key|value`
(batch, kv_heads, past, head_dim; empty for the prompt pass); outputs `logits` and `present.{i}.key|value`,
fed back as the next step's past. The same graph serves every family: GPT-2 (learned positions), Llama and
Qwen3 (rotary positions from `position_ids`, a grouped-query cache of fewer key/value heads). The loop here is the
same algorithm as `model.generate.generate`, so greedy tokens equal `gptflow generate` on the checkpoint the
bundle came from: left-padded batches with positions that count real tokens only, a stop at any of the model's
end tokens, and past the context a window of the last `context_length` tokens recomputed without a cache.

The prompt is built as `gptflow generate` builds it: the fine-tuning template (Alpaca or Phi-3) of an instruction
model, else the model's own chat template when it has one, else the text as it is.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge import BundleError, finite_logits
from edge.options import fit_context
from edge.runtime import LM, ORT_FILES, read_tokenizer_texts, session, tokenizer_files, verify_bundle
from edge.text import softmax

PAST = "past_key_values.{layer}.{kind}"
GPT2_EOT = 50256  # GPT-2's <|endoftext|> (edge.text.EOT_ID; not imported, so that tiktoken stays optional)


def mask_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids that count real tokens only (padding gets 0), as `model.gpt.mask_positions`."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)


class Decoder:
    """An ONNX decoder session and the generation loop around it."""

    def __init__(self, onnx_path: str | Path, context_length: int, threads: int | None = None) -> None:
        self.path = Path(onnx_path)
        self.session = session(onnx_path, threads)
        self.context_length = context_length
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise BundleError(f"{onnx_path} has no past_key_values inputs: not a language-model decoder")
        self.n_layers = len(past) // 2
        _, self.n_heads, _, self.head_dim = past[0].shape
        self.outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.n_layers)]

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (B, T, V), present) for the new tokens `input_ids` (B, T); `attention_mask` (B, past+T)."""
        past = past if past is not None else self.empty_past(len(input_ids))
        feeds = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask.astype(np.int64, copy=False),
            "position_ids": mask_positions(attention_mask)[:, -input_ids.shape[1] :],
        }
        for i in range(self.n_layers):
            feeds[PAST.format(layer=i, kind="key")] = past[2 * i]
            feeds[PAST.format(layer=i, kind="value")] = past[2 * i + 1]
        logits, *present = self.session.run(self.outputs, feeds)
        return logits, present

    def sequence_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (T, V) of one token row in a single pass without past (perplexity, teacher forcing)."""
        row = np.asarray([ids], dtype=np.int64)
        return self.run(row, np.ones_like(row))[0][0]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_id: int | Sequence[int] | None = GPT2_EOT,
        use_cache: bool = True,
        on_step: Callable[[np.ndarray], None] | None = None,
        pad_id: int | None = None,
    ) -> list[list[int]]:
        """The new tokens of each prompt (up to and including its end token). `eos_id`: one end token, several
        (Llama 3, Qwen3), or None to run to `max_new_tokens`. Prompts of different lengths are left-padded into one
        batch. `on_step(next_ids)` sees each step's tokens as they are produced (a finished row repeats the first
        end token, as `model.generate.generate` pads it). `pad_id` fills the left padding (masked out: any id of the
        vocabulary serves); default the first end token, else GPT-2's end of text."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BundleError("every prompt needs at least one token")
        rng = np.random.default_rng(seed)
        stops = None if eos_id is None else np.asarray([eos_id] if isinstance(eos_id, int) else list(eos_id))
        if pad_id is None:
            pad_id = int(stops[0]) if stops is not None and len(stops) else GPT2_EOT
            pad_id = pad_id if self.vocab_size is None or pad_id < self.vocab_size else 0
        width = max(len(p) for p in prompts)
        out = np.full((len(prompts), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(out)
        for row, prompt in enumerate(prompts):
            out[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        finished = np.zeros(len(prompts), dtype=bool)
        ctx, past = self.context_length, None
        for _ in range(max_new_tokens):
            if use_cache and out.shape[1] <= ctx:
                new = out if past is None else out[:, -1:]
                logits, past = self.run(new, mask, past)
            else:
                logits, _ = self.run(out[:, -ctx:], mask[:, -ctx:])
            next_ids = sample_next(finite_logits(logits[:, -1], self.path), temperature, top_k, top_p, rng)
            if stops is not None:
                next_ids = np.where(finished, stops[0], next_ids)
                finished |= np.isin(next_ids, stops)
            out = np.concatenate([out, next_ids[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            if on_step is not None:
                on_step(next_ids)
            if stops is not None and finished.all():
                break
        return [row[width:].tolist() for row in out]


def sample_next(
    logits: np.ndarray,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One token id per row of `logits` (B, V): argmax when `temperature` is 0, else sampled after top-k and
    top-p filtering (the same rules as `model.generate.sample_next`)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(axis=-1)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    rng = rng or np.random.default_rng()
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(scaled, axis=-1)[:, -min(top_k, scaled.shape[-1])][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    if top_p is not None:
        order = np.argsort(-scaled, axis=-1)
        sorted_probs = softmax(np.take_along_axis(scaled, order, axis=-1))
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scaled = np.where(drop, -np.inf, scaled)
    probs = softmax(scaled)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


class PromptTemplate:
    """The prompt format the model was tuned with, as stored in the bundle: for a text style (Alpaca, Phi-3)
    `without_input` and `with_input` are format strings with `{instruction}` (and `{input}`) fields; the style
    "chat" (tuned in the model's own chat template) keeps the keywords the template is rendered with. No template:
    the text is the prompt."""

    CHAT = "chat"

    def __init__(self, spec: dict | None) -> None:
        self.style = spec["style"] if spec else None
        self.spec = spec

    @property
    def chat(self) -> bool:
        return self.style == self.CHAT

    def format(self, instruction: str, input_text: str = "") -> str:
        if self.spec is None:
            return instruction + (f"\n{input_text}" if input_text else "")
        if self.chat:
            raise BundleError("this bundle's model was tuned in its chat template: the prompt is rendered by it")
        if input_text:
            return self.spec["with_input"].format(instruction=instruction, input=input_text)
        return self.spec["without_input"].format(instruction=instruction)


class EdgeGenerator:
    """A verified language-model bundle: tokenizer, prompt template and decoder (fp32, or int8)."""

    def __init__(self, bundle: str | Path, *, int8: bool = False, threads: int | None = None) -> None:
        self.bundle = Path(bundle)
        self.manifest = verify_bundle(self.bundle, LM)
        name = ORT_FILES["int8" if int8 else "fp32"]
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.bundle} holds no int8 model; export it with `gptflow export --int8`")
        self.text = BundleText(self.bundle, self.manifest)
        self.tokenizer = self.text.tokenizer
        self.template = PromptTemplate(self.manifest.get("prompt"))
        self.context_length = int(self.manifest["model"]["context_length"])
        self.eos_ids = self.text.eos_ids
        self.eos_id = self.eos_ids[0]
        self.pad_id = int(self.manifest.get("pad_id", self.eos_id))
        self.decoder = Decoder(self.bundle / name, self.context_length, threads)

    @property
    def chat(self) -> bool:
        """Prompts go through the model's chat template: it was tuned in it, or it has one and no text template."""
        return self.template.chat or (self.template.spec is None and self.text.chat_frame is not None)

    def encode(self, text: str, *, truncate: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a prompt; longer than the context: an error, or its last `context_length` tokens."""
        ids = self.text.encode(text, add_special_tokens=add_special_tokens) or [self.eos_id]
        return fit_context(ids, self.context_length, truncate)

    def instruction_ids(
        self, instruction: str, input_text: str = "", *, raw: bool = False, truncate: bool = False
    ) -> list[int]:
        """The prompt's token ids as `gptflow generate` builds them: the bundle's text template (Alpaca or Phi-3,
        its text read as data, as fine-tuning encoded it), else the model's chat template with the instruction (and
        input, after a blank line) as the user's message, else (or with `raw`) the text itself with the tokenizer's
        own special tokens (Llama 3's begin-of-text)."""
        if not raw and self.template.spec is not None and not self.template.chat:
            ids = self.text.encode_data(self.template.format(instruction, input_text))
            return fit_context(ids or [self.eos_id], self.context_length, truncate)
        if not raw and self.chat:
            content = instruction + (f"\n\n{input_text}" if input_text else "")
            return self.encode(self.text.render_chat(content), truncate=truncate)
        text = instruction + (f"\n{input_text}" if input_text else "")
        return self.encode(text, truncate=truncate, add_special_tokens=True)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 256,
        *,
        truncate: bool = False,
        on_text: Callable[[int, str], None] | None = None,
        **options,
    ) -> list[str]:
        """The response text of each prompt (a text with the template already applied, or token ids), stopping at
        any end token. `on_text(row, piece)` receives the text of each row as it is produced (a character split
        across tokens is held back until whole)."""
        ids = [self.encode(p, truncate=truncate) if isinstance(p, str) else list(p) for p in prompts]
        streams = [self.text.stream(skip_special_tokens=self.skip_special) for _ in prompts]
        done = [False] * len(prompts)
        shown = [""] * len(prompts)
        stops = set(self.eos_ids)

        def on_step(next_ids: np.ndarray) -> None:
            if on_text is None:
                return
            for row, token in enumerate(next_ids.tolist()):
                if done[row] or token in stops:
                    done[row] = True
                    continue
                piece = streams[row](token)
                if piece:
                    shown[row] += piece
                    on_text(row, piece)

        options.setdefault("pad_id", self.pad_id)
        new = self.decoder.generate(ids, max_new_tokens, eos_id=self.eos_ids, on_step=on_step, **options)
        answers = [self.text.decode(_until(row, stops), skip_special_tokens=self.skip_special) for row in new]
        if on_text is not None:  # what a stream held back (an unfinished character at the token limit)
            for row, answer in enumerate(answers):
                if answer.startswith(shown[row]) and len(answer) > len(shown[row]):
                    on_text(row, answer[len(shown[row]) :])
        return answers

    @property
    def skip_special(self) -> bool:
        """A model tuned in its chat template answers without special tokens, as `gptflow generate` prints it."""
        return self.template.chat


def _until(ids: list[int], stops: set[int]) -> list[int]:
    """The tokens before the first end token."""
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


class BundleText:
    """The bundle's tokenizer behind one interface: GPT-2's BPE through tiktoken (encoder.json, vocab.bpe), or the
    model's own Hugging Face tokenizer (tokenizer.json and its configs, through `tokenizers`). A chat template comes
    rendered by the export as the frame around one user message (`chat_frame`), so no jinja2 is needed. Only the
    package the bundle needs is imported."""

    def __init__(self, bundle: Path, manifest: dict[str, Any]) -> None:
        names = tokenizer_files(manifest, bundle / "manifest.json")
        self.hf = manifest.get("tokenizer", "gpt2") == "hf"
        if self.hf:
            from edge.hf_tokenizer import HFTokenizer

            self.tokenizer = HFTokenizer.from_files(read_tokenizer_texts(bundle, names), origin=bundle)
            frame = manifest.get("chat_frame")
            if frame is not None and not (isinstance(frame, list) and len(frame) == 2 and all(map(_is_str, frame))):
                raise BundleError(f"{bundle / 'manifest.json'}: chat_frame must be [text before, text after] a message")
            self.chat_frame = tuple(frame) if frame is not None else None
            eos_ids = self.tokenizer.eos_ids
        else:
            from edge.text import ENDOFTEXT, load_gpt2_encoding

            self.tokenizer = load_gpt2_encoding(bundle / names[0], bundle / names[1])
            self.chat_frame = None
            self._special = {ENDOFTEXT}
            eos_ids = [GPT2_EOT]
        stored = manifest.get("eos_ids", [manifest["eos_id"]] if "eos_id" in manifest else None)
        self.eos_ids = [int(i) for i in stored] if stored else list(eos_ids)
        if not self.eos_ids:
            raise BundleError(f"{bundle}: the tokenizer names no end token, so generation could never stop")

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """GPT-2: `<|endoftext|>` typed in a prompt is the end token, as `gptflow generate` reads it. A Hugging Face
        tokenizer: its special tokens written in the text are those tokens; `add_special_tokens` adds the ones
        its post-processor adds (Llama 3's begin-of-text)."""
        if self.hf:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode(text, allowed_special=self._special)

    def encode_data(self, text: str) -> list[int]:
        """A text-template prompt as fine-tuning encodes it: GPT-2 reads a literal `<|endoftext|>` in it as plain
        text; a Hugging Face tokenizer adds its post-processor's tokens, as transformers' `tokenizer(text)`."""
        if self.hf:
            return self.tokenizer.encode(text, add_special_tokens=True)
        return self.tokenizer.encode(text, disallowed_special=())

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, special tokens kept unless `skip_special_tokens` (GPT-2's BPE: `<|endoftext|>`)."""
        if not self.hf:
            return self.tokenizer.decode([i for i in ids if not (skip_special_tokens and i == GPT2_EOT)])
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, content: str) -> str:
        """A one-message conversation from the user, with the assistant's turn opened, in the model's template: the
        frame the export rendered (with the keywords the model was tuned with, `enable_thinking=False` for Qwen3)."""
        if self.chat_frame is None:
            raise BundleError("this bundle's model has no chat template")
        before, after = self.chat_frame
        return before + content + after

    def stream(self, *, skip_special_tokens: bool = False) -> Callable[[int], str]:
        """A function of one row's next token -> the new text it completes (empty while a character is unfinished)."""
        if not self.hf:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

            def piece(token: int) -> str:
                if skip_special_tokens and token == GPT2_EOT:
                    return ""
                return decoder.decode(self.tokenizer.decode_single_token_bytes(token))

            return piece
        ids: list[int] = []
        shown = [0]

        def step(token: int) -> str:
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
            if text.endswith("\ufffd"):  # the token ends inside a character: wait for the rest of its bytes
                return ""
            piece, shown[0] = text[shown[0] :], len(text)
            return piece

        return step
