"""Domain-adaptive pretraining (DAPT): next-token training on a classification data set's own texts before the
classifier is fine-tuned from it, through the one training loop (model.training).

The corpus is the training split plus the messages balancing left unused (`unused.csv`), an end-of-text token
after each; never a validation or test text. A short-message corpus uses a small part of GPT-2's 50257 tokens
(about a fifth for SMS spam), so the model trains in a compact vocabulary of only those tokens: the same
objective on this corpus (a full softmax over every token that can occur as a target) without the cost of
embedding rows and optimizer state that would never be touched. The trained rows are then scattered back into
the full-vocabulary model, which is saved in the model's token ids (GPT-2's, or those of the tokenizer its
checkpoint keeps, which the result keeps too); tokens the corpus lacks keep their starting rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gptflow.errors import GptflowError
from gptflow.splits import read_labelled, read_labels
from gptflow.stage import Stage
from gptflow.storage import sha256_bytes
from gptflow.tokenizer import EOT_ID
from model import lora
from model.configs import DomainTrainConfig, PretrainConfig
from model.gpt import GPTModel
from model.pretrain import LMResult, TokenWindows, finish_lm_stage, lm_loss, run_lm_stage
from model.training import train

CORPUS_FILES = ("train.csv", "unused.csv")  # unused.csv is optional: only balancing writes rows to it


class DaptError(GptflowError, ValueError):
    """The data set cannot be pretrained on (no texts, or fewer tokens than one window)."""


def corpus_tokens(data_dir: str | Path, tokenizer) -> np.ndarray:
    """The DAPT token stream of a data folder: its training and unused texts, an end-of-text token after each (the
    tokenizer's eos: GPT-2's 50256)."""
    data_dir = Path(data_dir)
    labels = read_labels(data_dir)
    texts: list[str] = []
    for name in CORPUS_FILES:
        if (path := data_dir / name).is_file():
            texts += read_labelled(path, labels)["text"].tolist()
    if not texts:
        raise DaptError(f"{data_dir}: no texts to pretrain on (expected a text column in train.csv)")
    if hasattr(tokenizer, "eos_ids"):  # the common interface: GPT2Text (the same ids as below) or a model's own
        ids, end = tokenizer.encode_batch(texts), tokenizer.eos_id
    else:  # tiktoken's GPT-2 encoding
        ids, end = tokenizer.encode_batch(texts, allowed_special="all"), EOT_ID
    return np.fromiter((t for row in ids for t in (*row, end)), dtype=np.int64)


def dapt_stage(
    data_dir: str | Path,
    start: Path | str,
    config: PretrainConfig,
    label: str,
    tokens: np.ndarray,
    out_dir: str | Path | None = None,
    force: bool = False,
) -> Stage:
    """The stage of pretraining the model keyed as `start` (a weights file, or a literal such as the shape of a
    random model) on `tokens` of `data_dir`; `label` names the starting model in the folder name."""
    if len(tokens) <= config.context_length:
        raise DaptError(
            f"{data_dir}: the training texts hold {len(tokens)} tokens, fewer than one window of "
            f"{config.context_length + 1} (dapt.window + 1); use a smaller dapt.window"
        )
    return Stage.declare(
        "dapt",
        inputs={"corpus": sha256_bytes(tokens.tobytes()), "start": start},
        config=config,
        code=__name__,
        label=f"{Path(data_dir).name}-{label}-seed{config.seed}",
        out_dir=out_dir,
        force=force,
    )


def domain_pretrain(
    stage: Stage,
    start: Callable[[], GPTModel],
    tokens: np.ndarray,
    config: DomainTrainConfig,
    *,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
    tokenizer_files: dict[str, str] | None = None,
    base: dict[str, str] | None = None,
) -> LMResult:
    """Pretrain the model `start()` builds (seeded) on `tokens` in `stage` (`dapt_stage`), whose `model.pt` is
    the full-vocabulary result (with `tokenizer_files`, the starting model's own tokenizer, where it has one); with
    `config.trainable` lora, LoRA adapters on the frozen model `base` (model.lora.base_record) names. Reused, resumed
    or run as the stage contract decides."""
    return run_lm_stage(
        stage, resume, lambda ckpt: _train(stage, ckpt, start, tokens, config, on_log, tokenizer_files, base)
    )


def _train(
    stage, checkpoint, start, tokens: np.ndarray, config: DomainTrainConfig, on_log, tokenizer_files=None, base=None
):
    keep, compact_ids = np.unique(tokens, return_inverse=True)
    full = start()
    if config.context_length > full.cfg.context_length:
        raise DaptError(
            f"dapt.window {config.context_length} exceeds the model's context length {full.cfg.context_length}"
        )
    model = compact_vocab(full, torch.from_numpy(keep))
    spec = config.lora_spec()
    if spec is not None:
        torch.manual_seed(config.seed)
        lora.apply_lora(model, spec, base)
    windows = TokenWindows(
        compact_ids.astype(np.int64), config.context_length, config.batch_size, "random", config.seed
    )

    def loss(batch):
        x, y = batch
        return lm_loss(model.features(x), model.head_weight(), y), {"tokens": x.numel()}

    if tokenizer_files:
        checkpoint.extra = {"tokenizer": tokenizer_files}
    state = train(
        model,
        config,
        stage=stage,
        checkpoint=checkpoint,
        total_steps=config.steps,
        batch=windows.batch,
        loss=loss,
        on_log=on_log,
    )
    if spec is not None:
        expand_adapters(full, model.cpu(), torch.from_numpy(keep))
    else:
        expand_vocab(full, model.cpu(), torch.from_numpy(keep))
    return finish_lm_stage(
        stage, full, state, tokenizer=tokenizer_files, corpus_tokens=len(tokens), vocab_used=len(keep)
    )


def compact_vocab(model: GPTModel, keep: torch.Tensor) -> GPTModel:
    """A copy of `model` whose vocabulary is the token ids `keep` (sorted), in that order."""
    compact = GPTModel(model.cfg.model_copy(update={"vocab_size": len(keep)}))
    state = model.state_dict()
    state["tok_emb.weight"] = state["tok_emb.weight"][keep]
    state["out_head.weight"] = state["out_head.weight"][keep]
    compact.load_state_dict(state)
    return compact


def expand_vocab(full: GPTModel, compact: GPTModel, keep: torch.Tensor) -> None:
    """Copy the weights of `compact` (vocabulary `keep`) into `full`, in place: its rows `keep` of the token
    embedding and of the output head are replaced, every other row stays."""
    state = compact.state_dict()
    with torch.no_grad():
        for name in ("tok_emb.weight", "out_head.weight"):
            target = full.get_parameter(name)
            target[keep] = state.pop(name)
        missing = full.load_state_dict(state, strict=False).missing_keys
    assert set(missing) <= {"tok_emb.weight", "out_head.weight"}, missing


def expand_adapters(full: GPTModel, compact: GPTModel, keep: torch.Tensor) -> None:
    """Give `full` the LoRA adapters of `compact` (vocabulary `keep`), in place: the head adapter's rows `keep` are
    the trained ones, every other token's update is zero; the frozen weights are `full`'s own already."""
    lora.apply_lora(full, compact.lora["spec"], compact.lora["base"])
    state = lora.trainable_state(compact)
    for name, rows in list(state.items()):
        if name.startswith("out_head.lora_B."):
            state[name] = rows.new_zeros(full.cfg.vocab_size, rows.shape[1]).index_copy(0, keep, rows)
    lora.load_weights(full, state, "the domain-pretrained adapters")
