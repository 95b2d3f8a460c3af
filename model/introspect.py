"""Look inside a checkpoint: what `gptflow inspect` reports about one probe text.

Any family the one model module builds (GPT-2, the Llama family, Qwen3), read with the model's own tokenizer: GPT-2's
BPE, or the Hugging Face tokenizer a converted checkpoint keeps (pieces and special tokens from its vocabulary).
Tokens and ids; a trace of one forward pass through block 0 and the last block (shape, mean, std and first values
of every step); every head's attention weights; the next-token distribution and how temperature / top-k / top-p
reshape it; a logit lens (each block's hidden state read out through the final norm and head); token embeddings in
2-D. A classifier checkpoint shows its backbone the same way, with class probabilities in place of next tokens.

A rotary model (Llama, Qwen3) has no position embeddings: its trace shows the queries and keys after the rotation,
and its positions figure shows block 0's keys without and with the rotation. A grouped-query layer's K and V rows
hold its fewer key/value heads; its attention weights are per query head, and each head names the key/value head
it reads (`kv_head`).

Everything is read off the model itself: forward hooks on its modules, its own attention-recording API
(`GPTModel.recording_attention`), its own final norm and head for the lens, its own rotary functions. No second
copy of the architecture. The numbers come back as one dict (`inspect_model`), which `eval.introspection` draws and
writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tiktoken
import torch

from gptflow.errors import GptflowError
from gptflow.tokenizer import GPT2Text
from model.classifier import SequenceClassifier
from model.config import GPTConfig
from model.configs import InspectConfig
from model.device import resolve_device
from model.files import INSPECTABLE
from model.forward_trace import traced_forward
from model.generate import next_token_distribution
from model.gpt import GPTModel, rope_angles, rope_frequencies, rotate
from model.opener import OpenedModel, open_model

MAX_POSITION_TOKENS = 24  # tokens of the probe drawn in the positions figure
SAMPLING_TOKENS = 12  # candidates compared in the sampling figure


class InspectError(GptflowError, ValueError):
    """The probe text or a requested layer/head does not fit the model, or the file is not a model."""


@dataclass
class Subject:
    """A checkpoint ready to inspect: a language model, or a classifier (`classifier` set) and its backbone."""

    path: Path
    model: GPTModel
    classifier: SequenceClassifier | None = None
    labels: list[str] | None = None
    style: str | None = None

    @property
    def kind(self) -> Literal["lm", "classifier"]:
        return "lm" if self.classifier is None else "classifier"


INSPECT_HINT = "; inspect a model.pt, a classifier's best.pt (one member of an ensemble), or GPT-2 weights"


def open_subject(spec: str | Path) -> OpenedModel:
    """The model file `gptflow inspect` reads: a language-model or classifier checkpoint (a file, or a folder holding
    model.pt / best.pt; `load-hf` writes one for any family), or GPT-2 weights (a preset, a .safetensors file or a
    folder holding one); no weights read."""
    return open_model(spec, INSPECTABLE, hint=INSPECT_HINT)


def load_subject(opened: OpenedModel) -> Subject:
    """The opened model, built and ready to inspect."""
    if opened.kind == "classifier":
        loaded = opened.classifier()
        return Subject(opened.path, loaded.model.backbone, loaded.model, loaded.names)
    return Subject(opened.path, opened.language_model(), style=opened.style)


# ------------------------------------------------------------------------------------------------- tokens


def text_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer behind the one interface every verb reads text with (`encode(text, add_special_tokens=...)`,
    `decode(ids, skip_special_tokens=...)`): GPT-2's tiktoken encoding wrapped in `GPT2Text`; a `GPT2Text` or an
    `edge.hf_tokenizer.HFTokenizer` (what `OpenedModel.tokenizer()` gives) as it is."""
    return GPT2Text(tokenizer) if isinstance(tokenizer, tiktoken.Encoding) else tokenizer


def probe_ids(tokenizer: Any, text: str) -> list[int]:
    """The probe's ids as the model reads plain text (as `gptflow generate --raw` and transformers' tokenizer call
    encode it): with the tokenizer's own special tokens added, such as Llama 3's `<|begin_of_text|>`; GPT-2 adds
    none and reads a written `<|endoftext|>` as its special token."""
    return text_tokenizer(tokenizer).encode(text, add_special_tokens=True)


def token_piece(tokenizer: Any, token_id: int) -> str:
    """A token's text as the tokenizer decodes it alone (a leading space included; a special token as written);
    bytes that are only part of a UTF-8 character show as U+FFFD."""
    tokenizer = text_tokenizer(tokenizer)
    if isinstance(tokenizer, GPT2Text):
        return tokenizer.encoding.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
    return tokenizer.decode([int(token_id)])


def vocabulary_entry(tokenizer: Any, token_id: int) -> str | None:
    """The token as its vocabulary spells it: `tokenizer.json`'s entry for a Hugging Face tokenizer (byte-level
    BPE writes a leading space as Ġ), GPT-2's `encoder.json` entry (the same byte-to-character map) for tiktoken."""
    tokenizer = text_tokenizer(tokenizer)
    if isinstance(tokenizer, GPT2Text):
        return "".join(_BYTE_CHARS[b] for b in tokenizer.encoding.decode_single_token_bytes(token_id))
    id_to_token = getattr(tokenizer, "id_to_token", None)
    return id_to_token(int(token_id)) if id_to_token is not None else None


def is_special(tokenizer: Any, token_id: int) -> bool:
    """A special token of the tokenizer (GPT-2's `<|endoftext|>`, Llama 3's `<|begin_of_text|>`, ...): one that
    decoding with `skip_special_tokens` drops. Plain added tokens (Qwen3's `<think>`) are not special."""
    tokenizer = text_tokenizer(tokenizer)
    return tokenizer.decode([int(token_id)], skip_special_tokens=True) == "" and tokenizer.decode([int(token_id)]) != ""


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (`bytes_to_unicode` of its encoder): the spelling of byte-level BPE
    vocabularies, a space as Ġ, a newline as Ċ."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()


def check_request(cfg: GPTConfig, text: str, config: InspectConfig, tokenizer: Any) -> list[int]:
    """The probe's token ids, once the text and the requested layer/head fit the model: an empty text, one longer
    than the context, or one with ids outside the model's vocabulary (another model's tokenizer) is refused."""
    if config.layer is not None and config.layer >= cfg.n_layers:
        raise InspectError(f"--layer {config.layer}: the model has {cfg.n_layers} layers (0-{cfg.n_layers - 1})")
    if config.head >= cfg.n_heads:
        raise InspectError(f"--head {config.head}: the model has {cfg.n_heads} heads per layer (0-{cfg.n_heads - 1})")
    if not text.strip():
        raise InspectError('the probe text is empty; give the text to inspect, e.g. "Every effort moves you"')
    ids = probe_ids(tokenizer, text)
    if len(ids) > cfg.context_length:
        raise InspectError(
            f"the probe text is {len(ids)} tokens; the model reads at most {cfg.context_length} (its context length)"
        )
    if ids and max(ids) >= cfg.vocab_size:
        raise InspectError(
            f"the probe text has token id {max(ids)}, outside the model's vocabulary of {cfg.vocab_size}: the "
            "tokenizer is not the model's"
        )
    return ids


def model_summary(cfg: GPTConfig) -> dict[str, Any]:
    """The shape the report shows: size, and the family's switches (norm, MLP, positions, key/value heads)."""
    return {
        **cfg.model_dump(include={"n_layers", "n_heads", "emb_dim", "context_length", "vocab_size"}),
        "family": cfg.family,
        "n_kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "norm": cfg.norm,
        "mlp": cfg.mlp,
        "positions": cfg.positions,
        "qk_norm": cfg.qk_norm,
    }


def inspect_model(subject: Subject, text: str, config: InspectConfig, tokenizer: Any) -> dict[str, Any]:
    """The inspection report of `text` (see the module docstring); `report["attention"]` is a float32 array
    (layers, heads, T, T), everything else is plain JSON. `tokenizer`: the model's (`OpenedModel.tokenizer()`), or
    GPT-2's tiktoken encoding."""
    tokenizer = text_tokenizer(tokenizer)
    model = subject.model
    cfg = model.cfg
    ids = check_request(cfg, text, config, tokenizer)
    layer = cfg.n_layers - 1 if config.layer is None else config.layer
    pieces = [token_piece(tokenizer, i) for i in ids]
    device = resolve_device(config.device)
    network = (subject.classifier or model).eval().to(device)
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        trace, attention, hidden, output = traced_forward(subject.model, subject.classifier, input_ids)
        lens = {**_logit_lens(subject, hidden, output, input_ids, tokenizer, config.top_k), "pieces": pieces}
        report = {
            "checkpoint": str(subject.path),
            "kind": subject.kind,
            "text": text,
            "style": subject.style,
            "model": {**model_summary(cfg), "params": sum(p.numel() for p in network.parameters())},
            "tokens": [
                {
                    "position": p,
                    "id": i,
                    "piece": pieces[p],
                    "token": vocabulary_entry(tokenizer, i),
                    "special": is_special(tokenizer, i),
                }
                for p, i in enumerate(ids)
            ],
            "trace": trace,
            "attention": attention,
            "heads": head_stats(attention, cfg.kv_heads),
            "focus": {"layer": layer, "head": config.head},
            "logit_lens": lens,
            "embeddings": {
                "words": word_embeddings(model, tokenizer, config.words),
                "positions": position_embeddings(model, ids, pieces, config.shuffle_seed),
            },
        }
        if subject.classifier is None:
            last = output[0, -1]
            report["next_token"] = _top_k(last, tokenizer, config.top_k)
            report["sampling"] = sampling_effects(last, tokenizer, config)
        else:
            probs = output[0].softmax(-1)
            report["classes"] = [
                {"label": name, "probability": float(p), "logit": float(z)}
                for name, p, z in zip(subject.labels, probs, output[0])
            ]
    network.to("cpu")
    return report


def head_stats(attention: np.ndarray, kv_heads: int | None = None) -> list[dict[str, Any]]:
    """Per head: mean weight on the previous token, the first token and itself (queries 1..T-1), and mean entropy;
    with `kv_heads` (grouped-query attention: fewer key/value heads than query heads) also the key/value head each
    query head reads, `kv_head` (query heads share key/value heads in blocks of n_heads / kv_heads)."""
    n_layers, n_heads, T, _ = attention.shape
    group = n_heads // kv_heads if kv_heads else 1
    rows = []
    queries = np.arange(1, T)
    for layer in range(n_layers):
        for head in range(n_heads):
            a = attention[layer, head].astype(np.float64)
            entropy = -(a * np.log(np.where(a > 0, a, 1.0))).sum(axis=-1).mean()
            stats: dict[str, Any] = {"layer": layer, "head": head}
            if kv_heads:
                stats["kv_head"] = head // group
            if T > 1:
                stats |= {
                    "previous_token": float(a[queries, queries - 1].mean()),
                    "first_token": float(a[queries, 0].mean()),
                    "self": float(a[queries, queries].mean()),
                }
            else:
                stats |= {"previous_token": None, "first_token": None, "self": None}
            rows.append({**stats, "entropy": float(entropy)})
    return rows


# --------------------------------------------------------------------------------------------- read-outs


def _logit_lens(
    subject: Subject, hidden: list, output: torch.Tensor, input_ids: torch.Tensor, tokenizer: Any, k: int
) -> dict:
    """Every hidden state (embeddings, then each block's output) read out through the final norm and the head:
    the LM head at every position, or the classifier's pooling and head; `final_prob` follows the model's own answer
    (`output`'s top-1). One layer's (T, V) probabilities at a time, so a long probe through a deep model never holds
    them all."""
    model = subject.model
    lens: dict[str, Any] = {"layers": ["embeddings"] + [f"block {i}" for i in range(len(model.blocks))]}
    if subject.classifier is None:
        final_id = int(output[0, -1].argmax())
        rows = []
        for h in hidden:
            probs = model.out_head(model.final_norm(h))[0].float().softmax(-1)  # (T, V)
            top1 = probs.max(dim=-1)
            rows.append(
                {
                    "top1_piece": [token_piece(tokenizer, int(i)) for i in top1.indices],
                    "top1_prob": [float(v) for v in top1.values],
                    "final_prob": float(probs[-1, final_id]),
                    "top_k_last": [
                        {"piece": token_piece(tokenizer, int(i)), "probability": float(v)}
                        for v, i in zip(*probs[-1].topk(k))
                    ],
                }
            )
    else:
        classifier, mask, labels = subject.classifier, torch.ones_like(input_ids), subject.labels
        class_probs = [
            classifier.head(classifier.pool(model.final_norm(h), mask))[0].float().softmax(-1) for h in hidden
        ]
        final_id = int(output[0].argmax())
        rows = [
            {
                "top1_piece": [labels[int(p.argmax())]],
                "top1_prob": [float(p.max())],
                "final_prob": float(p[final_id]),
                "top_k_last": [{"piece": name, "probability": float(v)} for name, v in zip(labels, p)],
            }
            for p in class_probs
        ]
    return lens | {key: [row[key] for row in rows] for key in ("top1_piece", "top1_prob", "final_prob", "top_k_last")}


def _top_k(logits: torch.Tensor, tokenizer: Any, k: int) -> list[dict[str, Any]]:
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(k, probs.numel()))
    return [
        {"rank": r + 1, "id": int(i), "piece": token_piece(tokenizer, int(i)), "probability": float(p),
         "logit": float(logits[i])}
        for r, (p, i) in enumerate(zip(values, indices))
    ]  # fmt: skip


def sampling_effects(logits: torch.Tensor, tokenizer: Any, config: InspectConfig) -> dict[str, Any]:
    """The next-token distribution under greedy decoding, each temperature, top-k and top-p (at temperature 1),
    through the same function that generation samples from."""
    settings = [("greedy", 0.0, None, None)]
    settings += [(f"T={t:g}", t, None, None) for t in config.temperatures]
    settings += [
        (f"top-k {config.sampling_top_k}", 1.0, config.sampling_top_k, None),
        (f"top-p {config.sampling_top_p:g}", 1.0, None, config.sampling_top_p),
    ]
    base = logits.float().softmax(-1)
    ids = base.topk(min(SAMPLING_TOKENS, base.numel())).indices
    rows = []
    for name, temperature, top_k, top_p in settings:
        probs = next_token_distribution(logits[None].float(), temperature=temperature, top_k=top_k, top_p=top_p)[0]
        kept = probs[probs > 0]
        rows.append(
            {
                "name": name,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "probs": [float(probs[i]) for i in ids],
                "entropy": float(-(kept * kept.log()).sum()) + 0.0,  # + 0.0: greedy gives -0.0
                "support": int(kept.numel()),
            }
        )
    return {"ids": [int(i) for i in ids], "pieces": [token_piece(tokenizer, int(i)) for i in ids], "settings": rows}


# -------------------------------------------------------------------------------------------- embeddings


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Points (N, E) projected on their two principal axes, and the share of variance each axis explains."""
    centered = points.double() - points.double().mean(dim=0)
    _, s, vt = torch.linalg.svd(centered, full_matrices=False)
    variance = s**2
    share = (variance / variance.sum()).tolist() if float(variance.sum()) > 0 else [0.0] * len(variance)
    axes = vt[:2]
    if axes.shape[0] < 2:  # fewer than 2 distinct directions: pad with a zero axis
        axes = torch.cat([axes, torch.zeros(2 - axes.shape[0], axes.shape[1], dtype=axes.dtype)])
        share += [0.0] * (2 - len(share))
    return centered @ axes.T, share[:2]


def word_embeddings(model: GPTModel, tokenizer: Any, words: tuple[str, ...]) -> dict[str, Any]:
    """Each word's token embedding (mean over its tokens when it has several, as a word after a space), in 2-D."""
    tokenizer = text_tokenizer(tokenizer)
    weight = model.tok_emb.weight
    vectors = torch.stack([weight[tokenizer.encode(" " + w, add_special_tokens=False)].mean(dim=0) for w in words])
    xy, share = pca_2d(vectors.float().cpu())
    return {"labels": list(words), "xy": xy.tolist(), "explained_variance": share}


def position_embeddings(model: GPTModel, ids: list[int], pieces: list[str], seed: int) -> dict[str, Any]:
    """The probe's token vectors, as written and shuffled, without and with positions: without them the shuffled
    tokens land on exactly the same points; positions are what tells the orders apart.

    Learned positions (GPT-2): token embeddings, then with the position embeddings added (`kind` "learned").
    Rotary positions (Llama, Qwen3) have no position embeddings: a token's position reaches the model only as a
    rotation of each head's queries and keys, so the vectors are block 0's keys of each token (all key/value heads,
    after k_norm where the model has one), without and with the rotation for their position (`kind` "rotary")."""
    n = min(len(ids), MAX_POSITION_TOKENS)
    order = np.random.default_rng(seed).permutation(n).tolist()
    if n > 1 and order == list(range(n)):
        order = order[::-1]
    device = model.tok_emb.weight.device
    tokens = model.tok_emb(torch.tensor(ids[:n], device=device))
    rotary = model.cfg.positions == "rope"
    if rotary:
        vectors = _block0_keys(model, tokens)  # (KV, n, D): a function of each token alone
        base = vectors.transpose(0, 1).flatten(1).float().cpu()

        def place(rows: list[int]) -> torch.Tensor:  # token rows[i] at position i, rotated there
            cos, sin = rope_angles(rope_frequencies(model.cfg, device), torch.arange(n, device=device), tokens.dtype)
            return rotate(vectors[:, rows][None], cos, sin)[0].transpose(0, 1).flatten(1).float().cpu()

        with_original, with_shuffled = place(list(range(n))), place(order)
    else:
        base = tokens.float().cpu()
        positions = model.pos_emb(torch.arange(n, device=device)).float().cpu()
        with_original, with_shuffled = base + positions, base[order] + positions
    result: dict[str, Any] = {
        "sentence": "".join(pieces[:n]),
        "pieces": pieces[:n],
        "order": order,
        "kind": "rotary" if rotary else "learned",
    }
    for name, original, moved in (
        ("without", base, base[order]),
        ("with", with_original, with_shuffled),
    ):
        xy, _ = pca_2d(torch.cat([original, moved]))
        result[name] = {"original": xy[:n].tolist(), "shuffled": xy[n:].tolist()}
        # token order[i] sits at shuffled position i: how far its vector moved
        result[f"shift_{name}"] = float((original[order] - moved).norm(dim=-1).mean()) if n else 0.0
    return result


def _block0_keys(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """Block 0's keys (kv_heads, n, head_dim) of token embeddings (n, E) before any rotation: its norm, the key
    part of its fused projection, and its k_norm where the model has one."""
    cfg, block = model.cfg, model.blocks[0]
    H, KV, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    keys = block.attn.qkv(block.norm1(tokens))[:, H * D : (H + KV) * D].view(-1, KV, D).transpose(0, 1)
    return block.attn.k_norm(keys) if cfg.qk_norm else keys
