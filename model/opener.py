"""The one checkpoint opener: every verb and stage that reads a model goes through `open_model`.

It resolves the spec (`model.files`), checks a file a stage wrote against its manifest's sha256, reads the
checkpoint's plain fields memory-mapped (no weights read yet), tells its kind from its format, and refuses a kind
the caller does not accept in one line that says what the file holds. The model is built only when asked for
(`language_model()`, `classifier()`), and its weights must be finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from gptflow.prompts import RESPONSE_MARKERS
from gptflow.stage import verify_output
from model.checkpoint import FORMAT as LM_FORMAT
from model.checkpoint import load_checkpoint, model_from_state
from model.classifier import ENSEMBLE_FORMAT, LoadedClassifier, classifier_from_state
from model.classifier import FORMAT as CLASSIFIER_FORMAT
from model.config import GPTConfig, ModelConfigError
from model.files import CheckpointError, Kind, is_weights, model_file
from model.gpt import GPTModel

WHAT: dict[str, str] = {
    "lm": "a language-model checkpoint",
    "instruct": "an instruction-tuned language-model checkpoint",
    "classifier": "a classifier checkpoint",
    "ensemble": "a classifier-ensemble checkpoint",
    "gpt2": "GPT-2 weights",
}


@dataclass
class OpenedModel:
    """A model file whose kind is known; `state` holds its plain fields (memory-mapped tensors; None for GPT-2
    weights), `config` its shape (None for an ensemble, whose members have their own)."""

    spec: str | Path
    path: Path  # a GPT-2 preset's: the fetched (or mirrored) model.safetensors
    kind: Kind
    state: dict[str, Any] | None
    config: GPTConfig | None

    @property
    def style(self) -> str | None:
        """The prompt style an instruction model was fine-tuned with."""
        return self.state.get("style") if self.state is not None else None

    def tokenizer(self, settings=None):
        """The tokenizer the model reads text with: the Hugging Face tokenizer whose files the checkpoint keeps
        (`load-hf` of a model with its own vocabulary), else GPT-2's BPE."""
        from gptflow.tokenizer import model_tokenizer

        files = self.state.get("tokenizer") if self.state is not None else None
        return model_tokenizer(files, settings)

    def language_model(self, settings=None, *, merged: bool = True) -> GPTModel:
        """The language model, in eval mode on the CPU (a classifier's: its backbone); a LoRA checkpoint's with its
        adapters merged into plain weights, unless `merged` is False."""
        if self.kind == "gpt2":
            from model.weights import load_gpt2

            return load_gpt2(self.spec, settings)[0]
        if self.kind == "classifier":
            return self.classifier(merged=merged).model.backbone
        if self.kind == "ensemble":
            raise CheckpointError(f"{self.path} is {WHAT['ensemble']}: it has no single language model")
        return model_from_state(self.state, self.path, merged=merged, settings=settings)[0].eval()

    @property
    def lora(self) -> dict[str, Any] | None:
        """A LoRA checkpoint's adapters (rank, alpha, dropout, targets, modules); None for plain weights."""
        return self.state.get("lora") if self.state is not None else None

    def classifier(self, *, merged: bool = True) -> LoadedClassifier:
        """The classifier (or ensemble), in eval mode (a LoRA classifier's adapters merged unless `merged` is False)."""
        if self.kind not in ("classifier", "ensemble"):
            raise CheckpointError(f"{self.path} is {WHAT[self.kind]}, not a classifier checkpoint")
        return classifier_from_state(self.state, self.path, merged=merged)


def open_model(spec: str | Path, kinds: Collection[Kind], *, hint: str = "", settings=None) -> OpenedModel:
    """The model `spec` names (a file, a folder holding one, or a GPT-2 preset) if its kind is one of `kinds`; else
    a CheckpointError that says what it is, followed by `hint` (which verb takes it)."""
    path = model_file(spec, kinds)
    if path is None or is_weights(path, kinds):
        from model.weights import weights_config

        file, config = weights_config(spec, settings)
        return OpenedModel(spec, file, "gpt2", None, config)
    verify_output(path)
    state = load_checkpoint(path, mmap=True)
    kind = kind_of(state, path, kinds)
    if kind not in kinds and not (kind == "instruct" and "lm" in kinds):
        found = WHAT[kind]
        if kind == "ensemble":
            found += f" of {len(state['members'])} classifiers ({', '.join(m['checkpoint'] for m in state['members'])})"
        raise CheckpointError(f"{path} is {found}, not {_either(kinds)}{hint}")
    try:
        config = GPTConfig.from_dict(state["config"]) if kind != "ensemble" else None
    except ModelConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return OpenedModel(spec, path, kind, state, config)


def kind_of(state: dict[str, Any], path: Path, kinds: Collection[Kind]) -> Kind:
    """The kind a loaded checkpoint's format says it is."""
    fmt = state.get("format")
    if fmt == LM_FORMAT and isinstance(state.get("config"), dict) and "model" in state:
        return "instruct" if state.get("style") in RESPONSE_MARKERS else "lm"
    if fmt == CLASSIFIER_FORMAT and isinstance(state.get("config"), dict):
        return "classifier"
    if fmt == ENSEMBLE_FORMAT and isinstance(state.get("members"), list):
        return "ensemble"
    raise CheckpointError(f"{path} is not a gptflow checkpoint (format {fmt!r}); expected {_either(kinds)}")


def _either(kinds: Collection[Kind]) -> str:
    """ "a language-model checkpoint or a classifier checkpoint" (an instruction model counts as a language model
    where both are accepted)."""
    wanted = [k for k in dict.fromkeys(kinds) if not (k == "instruct" and "lm" in kinds)]
    return " or ".join(WHAT[k] for k in wanted)
