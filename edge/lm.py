"""Text generation with an exported language-model bundle: onnxruntime, NumPy and tiktoken only.

The bundle's decoder is one ONNX graph for the prompt pass and every decoding step: inputs `input_ids`,
`attention_mask` (past + new tokens, 1 = real), `position_ids` and `past_key_values.{i}.key|value`
(batch, heads, past, head_dim; empty for the prompt pass); outputs `logits` and `present.{i}.key|value`,
fed back as the next step's past. The loop here is the same algorithm as `model.generate.generate`, so greedy
tokens equal `gptflow generate` on the checkpoint the bundle came from: left-padded batches with positions that
count real tokens only, end-of-text stop, and past the context a window of the last `context_length` tokens
recomputed without a cache.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge import BundleError, finite_logits
from edge.options import fit_context
from edge.runtime import LM, ORT_FILES, session, verify_bundle
from edge.text import ENDOFTEXT, EOT_ID, load_gpt2_encoding

PAST = "past_key_values.{layer}.{kind}"


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
        eos_id: int | None = EOT_ID,
        use_cache: bool = True,
        on_step: Callable[[np.ndarray], None] | None = None,
        pad_id: int = EOT_ID,
    ) -> list[list[int]]:
        """The new tokens of each prompt (up to and including its end-of-text). Prompts of different lengths
        are left-padded into one batch. `on_step(next_ids)` sees each step's tokens as they are produced (a
        finished row repeats `eos_id`)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BundleError("every prompt needs at least one token")
        rng = np.random.default_rng(seed)
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
            if eos_id is not None:
                next_ids = np.where(finished, eos_id, next_ids)
                finished |= next_ids == eos_id
            out = np.concatenate([out, next_ids[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            if on_step is not None:
                on_step(next_ids)
            if eos_id is not None and finished.all():
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
        sorted_probs = _softmax(np.take_along_axis(scaled, order, axis=-1))
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scaled = np.where(drop, -np.inf, scaled)
    probs = _softmax(scaled)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class PromptTemplate:
    """The prompt format the model was tuned with, as stored in the bundle: `without_input` and `with_input`
    are format strings with `{instruction}` (and `{input}`) fields. No template: the text is the prompt."""

    def __init__(self, spec: dict | None) -> None:
        self.style = spec["style"] if spec else None
        self.spec = spec

    def format(self, instruction: str, input_text: str = "") -> str:
        if self.spec is None:
            return instruction + (f"\n{input_text}" if input_text else "")
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
        self.tokenizer = load_gpt2_encoding(self.bundle / "encoder.json", self.bundle / "vocab.bpe")
        self.template = PromptTemplate(self.manifest.get("prompt"))
        self.context_length = int(self.manifest["model"]["context_length"])
        self.eos_id = int(self.manifest.get("eos_id", EOT_ID))
        self.decoder = Decoder(self.bundle / name, self.context_length, threads)

    def encode(self, text: str, *, truncate: bool = False) -> list[int]:
        """Token ids of a prompt; longer than the context: an error, or its last `context_length` tokens."""
        ids = self.tokenizer.encode(text, allowed_special={ENDOFTEXT}) or [self.eos_id]
        return fit_context(ids, self.context_length, truncate)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 256,
        *,
        truncate: bool = False,
        on_text: Callable[[int, str], None] | None = None,
        **options,
    ) -> list[str]:
        """The response text of each prompt (template already applied), stopping at end-of-text.
        `on_text(row, piece)` receives the text of each row as it is produced (UTF-8 split across tokens is
        held back until whole)."""
        ids = [self.encode(p, truncate=truncate) for p in prompts]
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompts]
        done = [False] * len(prompts)

        def on_step(next_ids: np.ndarray) -> None:
            if on_text is None:
                return
            for row, token in enumerate(next_ids.tolist()):
                if done[row] or token == self.eos_id:
                    done[row] = True
                    continue
                piece = decoders[row].decode(self.tokenizer.decode_single_token_bytes(token))
                if piece:
                    on_text(row, piece)

        new = self.decoder.generate(ids, max_new_tokens, eos_id=self.eos_id, on_step=on_step, **options)
        return [self.tokenizer.decode(row[: row.index(self.eos_id)] if self.eos_id in row else row) for row in new]
