"""Where a model starts: `random` (a preset), `gpt2:<preset-or-path>` (public GPT-2 weights), `checkpoint:<path>`
(our pretraining or `load-gpt2`/`load-hf` output) or `hf:<repo-or-folder>` (a Hugging Face model of the GPT-2 or
Llama family or Qwen3, converted once by `model.hf_models.convert_hf` and reused). The spec is parsed once, into
`InitSpec`.

The model's tokenizer travels with it: `InitSpec.tokenizer()` is the one its checkpoint keeps (a Hugging Face
model's own files), else GPT-2's BPE; a stage built on it reads text with that tokenizer and writes the same
`tokenizer` field into every checkpoint it makes (`InitSpec.tokenizer_files()`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from gptflow.errors import GptflowError
from gptflow.settings import Settings
from model.config import GPTConfig
from model.files import CHECKPOINT_LMS, LM_FILE

if TYPE_CHECKING:
    from model.gpt import GPTModel

INIT_HELP = (
    "random | gpt2:<preset-or-safetensors> | checkpoint:<path> (our pretraining, load-gpt2 or load-hf output) | "
    "hf:<repo-or-folder> (a Hugging Face model: GPT-2, Llama family, Qwen3)"
)
KINDS = ("checkpoint", "gpt2", "hf")
# hf: specs converted in this process: (ref, home, mirror) -> checkpoint (the conversion hashes every file).
_CONVERTED: dict[tuple[str, str, str], Path] = {}


class InitSpecError(GptflowError, ValueError):
    """An init spec is malformed or names a checkpoint that does not exist."""


class InitSpec(str):
    """An init spec string, validated when made; `kind` and `ref` are its parts. A pydantic field of this type
    validates and serializes as a plain string."""

    kind: str
    ref: str

    def __new__(cls, value: str) -> "InitSpec":
        kind, sep, ref = str(value).partition(":")
        if not (value == "random" or (sep and kind in KINDS and ref.strip())):
            raise InitSpecError(f"expected {INIT_HELP}, got {value!r}")
        spec = super().__new__(cls, value)
        spec.kind, spec.ref = kind, ref.strip()
        return spec

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def parse(value: str) -> "InitSpec":
            try:
                return cls(value)
            except InitSpecError as exc:
                raise ValueError(str(exc)) from None

        return core_schema.no_info_after_validator_function(
            parse, core_schema.str_schema(), serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    def label(self, preset: str) -> str:
        """Short name of the starting point, for folder names."""
        if self.kind == "random":
            return preset
        path = Path(self.ref.rstrip("/"))
        if path.name in (LM_FILE, "model.safetensors"):
            return path.parent.name
        return path.stem if path.suffix in (".pt", ".safetensors") else path.name

    def file(self, settings: Settings | None = None) -> Path | None:
        """The local weights file (None for random); GPT-2 weights named by preset are fetched, a Hugging Face model
        is converted to our checkpoint (`<home>/models/<name>/model.pt`, reused)."""
        if self.kind == "random":
            return None
        if self.kind == "hf":
            return _convert_hf(self.ref, settings)
        if self.kind == "checkpoint":
            path = Path(self.ref).expanduser()
            path = path / LM_FILE if path.is_dir() else path
            if not path.is_file():
                raise InitSpecError(
                    f"init {self}: no such checkpoint (expected a gptflow .pt file or a folder "
                    f"with {LM_FILE}, e.g. a pretraining output)"
                )
            return path
        from model.weights import resolve_weights

        return resolve_weights(self.ref, settings)[0]

    def stage_input(self, settings: Settings | None = None) -> Path | str:
        """What a stage built on this init is keyed on: the weights file (hashed), or "random"."""
        return self.file(settings) or "random"

    def build(
        self,
        preset: str,
        *,
        shape: GPTConfig | None = None,
        dropout: float = 0.0,
        seed: int = 0,
        context_length: int | None = None,
        settings: Settings | None = None,
    ) -> GPTModel:
        """The starting model with the requested dropout (seeded when random: the preset's shape, or `shape`)."""
        import torch

        from model.gpt import GPTModel

        if self.kind == "random":
            overrides: dict[str, Any] = {"dropout": dropout}
            if context_length is not None:
                overrides["context_length"] = context_length
            torch.manual_seed(seed)
            base = shape.to_dict() if shape is not None else GPTConfig.from_preset(preset).to_dict()
            return GPTModel(GPTConfig.from_dict({**base, **overrides}))
        if self.kind == "gpt2":
            from model.weights import load_gpt2

            return load_gpt2(self.ref, settings, dropout=dropout)[0]
        from model.opener import open_model  # the opener imports the classifier, which imports this module

        loaded = open_model(self.file(settings), CHECKPOINT_LMS).language_model(settings)  # a LoRA one merged
        with torch.device("meta"):  # the loaded tensors are taken over: no random init, no second copy
            model = GPTModel(loaded.cfg.model_copy(update={"dropout": dropout}))
        model.load_state_dict(loaded.state_dict(), assign=True)
        if model.cfg.tie_weights:  # assigning gives the head a parameter of its own: tie it again
            model.out_head.weight = model.tok_emb.weight
        return model

    def tokenizer_files(self, settings: Settings | None = None) -> dict[str, str] | None:
        """The texts of the tokenizer files the starting checkpoint keeps (name -> text), None where the model reads
        GPT-2's BPE (random, GPT-2 weights, and every checkpoint whose vocabulary is GPT-2's)."""
        if self.kind in ("random", "gpt2"):
            return None
        from model.checkpoint import load_checkpoint

        files = load_checkpoint(self.file(settings), mmap=True).get("tokenizer")
        return dict(files) if files else None

    def tokenizer(self, settings: Settings | None = None, given: Any = None) -> Any:
        """The tokenizer the starting model reads text with (`text_tokenizer`): its checkpoint's own, else GPT-2's
        BPE (`given` when the caller already has it: a tiktoken encoding or a `GPT2Text`)."""
        return text_tokenizer(self.tokenizer_files(settings), given, settings)


def text_tokenizer(files: dict[str, str] | None, given: Any = None, settings: Settings | None = None) -> Any:
    """The tokenizer of a model whose checkpoint keeps tokenizer `files` (an `HFTokenizer`), or, for `files` None,
    GPT-2's BPE behind the same interface (`GPT2Text`): `given` as it is when it already has that interface,
    wrapped when it is a tiktoken encoding, else built from the mirrored or downloaded files."""
    from gptflow.tokenizer import GPT2Text, model_tokenizer

    if files:
        return model_tokenizer(dict(files), settings)
    if given is None:
        return model_tokenizer(None, settings)
    return given if hasattr(given, "eos_ids") else GPT2Text(given)


def _convert_hf(ref: str, settings: Settings | None) -> Path:
    """Our checkpoint of the Hugging Face model `ref` (converted once per home; each process checks it once)."""
    from gptflow.settings import get_settings
    from model.hf_models import convert_hf

    settings = settings or get_settings()
    key = (ref, str(settings.home.resolve()), str(settings.mirror))
    path = _CONVERTED.get(key)
    if path is None or not path.is_file():
        path = _CONVERTED[key] = convert_hf(ref, settings)[0]
    return path
