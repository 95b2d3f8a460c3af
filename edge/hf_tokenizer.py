"""A Hugging Face model's own tokenizer, without transformers: `tokenizers` only.

GPT-2's vocabulary lives in `edge.text`; a model fine-tuned from a Hub checkpoint (SmolLM, Llama 3, Qwen3, ...)
brings its own: `tokenizer.json` (the `tokenizers` pipeline), `tokenizer_config.json` (special tokens, chat
template), optionally `chat_template.jinja`, `generation_config.json` (the eos ids generation stops on) and the
legacy `special_tokens_map.json`. `HFTokenizer` reads them the way transformers 5 does, so its token ids equal
`AutoTokenizer.from_pretrained(folder)`'s. It keeps the files' exact texts (`.files`), so a checkpoint or an export
bundle can store them and rebuild the same tokenizer anywhere.

Rendering a chat template needs jinja2, which the edge runtime does not carry: `gptflow.chat_template` renders on the
training side, and an export bundle keeps its prompt frame already rendered (`chat_prompt` in its manifest).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from edge import BundleError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TEMPLATES_DIR = "additional_chat_templates"  # transformers 5: named templates, `<name>.jinja`
FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE, GENERATION_CONFIG, SPECIAL_TOKENS_MAP)
# transformers' named special tokens, in its order; a config's other `*_token` keys are named tokens too.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _is_file_name(name: str) -> bool:
    return name in FILES or (name.startswith(TEMPLATES_DIR + "/") and name.endswith(".jinja") and name.count("/") == 1)


def _json_object(files: Mapping[str, str], name: str, where: str) -> dict | None:
    """The JSON object in `files[name]`, None when absent; a one-line BundleError when it is no JSON object."""
    if name not in files:
        return None
    try:
        value = json.loads(files[name])
    except json.JSONDecodeError as exc:
        raise BundleError(f"{where}{name} is not valid JSON ({exc}): expected a JSON object") from None
    if not isinstance(value, dict):
        raise BundleError(f"{where}{name} holds a JSON {type(value).__name__}: expected a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as written in a config: a string, or an AddedToken dict whose `content` is the string."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value: Any) -> AddedToken:
    """The AddedToken transformers adds for a special token that tokenizer.json lacks."""
    if isinstance(value, dict):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], **{"normalized": False, **flags}, special=True)
    return AddedToken(value, special=True, normalized=False)


class HFTokenizer:
    """A Hub model's tokenizer.json + configs: ids and special tokens equal to transformers'; its chat templates
    as text."""

    def __init__(self, files: Mapping[str, str], *, origin: str | Path | None = None) -> None:
        where = f"{origin}/" if origin is not None else ""
        unknown = sorted(name for name in files if not _is_file_name(name))
        if unknown:
            raise BundleError(f"unknown tokenizer files {', '.join(unknown)}: expected some of {', '.join(FILES)}")
        if TOKENIZER_JSON not in files:
            raise BundleError(f"{where}{TOKENIZER_JSON} is missing: a Hugging Face tokenizer needs the file")
        self._files = dict(files)
        try:
            self._tokenizer = Tokenizer.from_str(files[TOKENIZER_JSON])
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BundleError(f"{where}{TOKENIZER_JSON} is not a tokenizers serialization: {first}") from None
        config = _json_object(files, TOKENIZER_CONFIG, where) or {}
        generation = _json_object(files, GENERATION_CONFIG, where) or {}
        legacy_map = _json_object(files, SPECIAL_TOKENS_MAP, where)

        # transformers pads and truncates only when asked; a tokenizer.json may carry either setting.
        padding = self._tokenizer.padding
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        # transformers skips `clean_up_tokenization_spaces` for BPE, where it would corrupt text.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and (
            type(self._tokenizer.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        )
        self._special, extra = self._read_special_tokens(config, legacy_map, padding)

        # Like transformers, add the special tokens tokenizer.json lacks as added tokens (the vocabulary grows).
        added = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        missing = list(self._special.values()) + (extra if isinstance(extra, list) else [])
        for token in missing:
            if (text := _token_text(token)) is not None and text not in added:
                added.add(text)
                self._tokenizer.add_special_tokens([_added_token(token)])

        self._generation = generation
        self._eos_generation = self._generation_ids(generation.get("eos_token_id"), where)
        self._templates = self._read_templates(files, config, where)

    @staticmethod
    def _read_special_tokens(config: dict, legacy_map: dict | None, padding: dict | None) -> tuple[dict, Any]:
        """({name: token as written}, extra special tokens) as transformers 5 resolves them: tokenizer_config.json,
        overridden by special_tokens_map.json only where the config has no `added_tokens_decoder` (the map is legacy
        there), and tokenizer.json's padding token where no pad token is named at all."""
        values = {k: v for k, v in config.items() if k in NAMED_TOKENS or (k.endswith("_token") and _token_text(v))}
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        if isinstance(extra, dict):
            values.update({k: v for k, v in extra.items() if _token_text(v) is not None})
        if legacy_map is not None and "added_tokens_decoder" not in config:
            values.update({k: v for k, v in legacy_map.items() if k.endswith("_token")})
            legacy_extra = legacy_map.get("extra_special_tokens", legacy_map.get("additional_special_tokens"))
            if isinstance(legacy_extra, dict):
                values.update({k: v for k, v in legacy_extra.items() if _token_text(v) is not None})
            elif isinstance(legacy_extra, list):
                extra = (extra if isinstance(extra, list) else []) + legacy_extra
        if padding is not None and "pad_token" not in values:
            values["pad_token"] = padding["pad_token"]
        order = [k for k in NAMED_TOKENS if k in values] + [k for k in values if k not in NAMED_TOKENS]
        return {k: values[k] for k in order if _token_text(values[k]) is not None}, extra

    @staticmethod
    def _generation_ids(value: Any, where: str) -> list[int]:
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise BundleError(f"{where}{GENERATION_CONFIG} has eos_token_id {value!r}: expected a token id or a list")
        return values

    @staticmethod
    def _read_templates(files: Mapping[str, str], config: dict, where: str) -> dict[str, str]:
        """Named templates; template files beside the config replace the config's `chat_template` entirely."""
        from_files = {
            name.removeprefix(TEMPLATES_DIR + "/").removesuffix(".jinja"): text
            for name, text in files.items()
            if name.startswith(TEMPLATES_DIR + "/")
        }
        if CHAT_TEMPLATE_FILE in files:
            from_files["default"] = files[CHAT_TEMPLATE_FILE]
        if from_files:
            return from_files
        value = config.get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
        ):
            return {t["name"]: t["template"] for t in value}
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
        raise BundleError(
            f"{where}{TOKENIZER_CONFIG} has a chat_template of type {type(value).__name__}: "
            'expected a string or a list of {"name": ..., "template": ...}'
        )

    @classmethod
    def from_files(cls, files: Mapping[str, str], *, origin: str | Path | None = None) -> HFTokenizer:
        """From the files' texts (name -> text), as `.files` gives them back; `origin` only names them in errors."""
        return cls(files, origin=origin)

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        """From a model folder as transformers' save_pretrained writes it (tokenizer.json required)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleError(f"{folder} is not a folder: expected a Hugging Face tokenizer folder with tokenizer.json")
        paths = [folder / name for name in FILES] + sorted((folder / TEMPLATES_DIR).glob("*.jinja"))
        files = {}
        for path in paths:
            if not path.is_file():
                continue
            try:
                files[path.relative_to(folder).as_posix()] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BundleError(f"{path} cannot be read as UTF-8 text: {exc}") from None
        return cls(files, origin=folder)

    @property
    def files(self) -> dict[str, str]:
        """The texts this tokenizer was built from (name -> text): store them to rebuild it with `from_files`."""
        return dict(self._files)

    # Ids and text.

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids; `add_special_tokens` applies tokenizer.json's post-processor (Llama 3's bos, for one)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` of each text, in parallel in the Rust library."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text for `ids`; `skip_special_tokens` drops special tokens (not plain added ones such as Qwen's <think>)."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up:  # an old WordPiece/Unigram config's `clean_up_tokenization_spaces`, as transformers does
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
                text = text.replace(before, after)
            for suffix in ("'m", "'s", "'ve", "'re"):
                text = text.replace(" " + suffix, suffix)
        return text

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included: the least embedding size."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(int(token_id))

    # Special tokens.

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (bos_token, eos_token, ... and a model's own `*_token`s): what templates get."""
        return {k: _token_text(v) for k, v in self._special.items()}

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self.special_tokens.get("unk_token")

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_ids(self) -> list[int]:
        """Every id generation stops on: generation_config.json's first (Llama 3 lists several), then the eos token."""
        ids = self._eos_generation + [i for i in [self._id(self.eos_token)] if i is not None]
        return list(dict.fromkeys(ids))

    @property
    def eos_id(self) -> int | None:
        return next(iter(self.eos_ids), None)

    @property
    def pad_id(self) -> int | None:
        """The pad token's id; models without one (Llama 3) pad with eos, which attention masks out anyway."""
        pad = self._id(self.pad_token)
        return pad if pad is not None else self.eos_id

    # Chat.

    @property
    def generation_config(self) -> dict[str, Any]:
        """generation_config.json as the model ships it (its end tokens, and its sampling defaults when it samples)."""
        return dict(self._generation)

    @property
    def chat_templates(self) -> dict[str, str]:
        """Every named template ("default", "tool_use", ...)."""
        return dict(self._templates)

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")
