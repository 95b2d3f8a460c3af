"""A text corpus -> GPT-2 token ids in `uint16` `train.bin` / `val.bin` (nanoGPT layout).

Read them with `numpy.memmap(path, dtype=numpy.uint16, mode="r")`; `meta.json` holds the counts and the
source hash. The split is by token position: the first 90% train, the rest validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.common import DataError, StageResult, decode_unicode, floor_count, require_file, require_text
from data.config import CorpusConfig
from gptflow.download import fetch_source
from gptflow.settings import Settings, get_settings
from gptflow.stage import Built, Stage
from gptflow.storage import (
    atomic_path,
    sha256_file,
    write_json_atomic,
)
from gptflow.tokenizer import VOCAB_SIZE, encode, get_tokenizer

STAGE = "data-corpus"
NAMED = ("the-verdict", "tinyshakespeare")  # registered download sources
DTYPE = np.uint16  # 50257 ids fit in 16 bits
OUTPUTS = ["train.bin", "val.bin", "meta.json"]
TEXT = "UTF-8 text to pretrain on"


class CorpusError(DataError):
    """A corpus name is unknown, or its file is missing, empty, binary or not UTF-8 text."""


def resolve_corpus(name_or_path: str, settings: Settings) -> tuple[str, Path]:
    """(name, file): a registered corpus (fetched) or a text file (named `<stem>-<sha8>`)."""
    if name_or_path in NAMED:
        return name_or_path, fetch_source(name_or_path, settings)
    path = Path(name_or_path)
    if not path.exists():
        raise CorpusError(f"{name_or_path}: not a known corpus ({', '.join(NAMED)}) nor an existing text file")
    require_file(path, CorpusError, TEXT)
    return f"{path.stem}-{sha256_file(path)[:8]}", path


def read_text(path: Path) -> str:
    text = decode_unicode(path, path.read_bytes(), CorpusError, TEXT)
    require_text(path, text, CorpusError, TEXT)
    return text


def _write_tokens(tokens: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        tokens.tofile(tmp)


def prepare_corpus(
    name_or_path: str, config: CorpusConfig | None = None, settings: Settings | None = None
) -> StageResult:
    """Tokenize a corpus into `<home>/data/corpus/<name>/{train,val}.bin` + `meta.json`."""
    config = config or CorpusConfig()
    settings = settings or get_settings()
    name, path = resolve_corpus(name_or_path, settings)
    out_dir = settings.home / "data" / "corpus" / name
    digest = sha256_file(path)
    stage = Stage.declare(
        STAGE,
        inputs={path.name: digest},
        config=config.model_dump(mode="json") | {"tokenizer": "gpt2"},
        code=__name__,
        folder=out_dir,
    )
    result = stage.run(lambda decision: _build(path, name, digest, out_dir, config, settings))
    return StageResult.from_folder(out_dir, "meta.json") if result.reused else StageResult(out_dir, False, result.value)


def _build(path: Path, name: str, digest: str, out_dir: Path, config: CorpusConfig, settings: Settings) -> Built:
    text = read_text(path)
    tokens = np.array(encode(get_tokenizer(settings), text), dtype=DTYPE)
    n_train = floor_count(len(tokens) * (1 - config.val_fraction))
    if n_train < 1 or n_train == len(tokens):
        raise CorpusError(
            f"{path}: {len(tokens)} tokens are too few to split into train and validation "
            f"at val_fraction {config.val_fraction:g}"
        )
    meta = {
        "stage": STAGE,
        "name": name,
        "source": str(path),
        "source_sha256": digest,
        "chars": len(text),
        "tokens": len(tokens),
        "train_tokens": n_train,
        "val_tokens": len(tokens) - n_train,
        "dtype": np.dtype(DTYPE).name,
        "vocab_size": VOCAB_SIZE,
        "tokenizer": "gpt2",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tokens(tokens[:n_train], out_dir / "train.bin")
    _write_tokens(tokens[n_train:], out_dir / "val.bin")
    write_json_atomic(out_dir / "meta.json", meta)
    return Built(OUTPUTS, {k: meta[k] for k in ("tokens", "train_tokens", "val_tokens")}, meta)


def summary_rows(meta: dict) -> list[dict]:
    return [
        {"split": "train", "tokens": meta["train_tokens"], "file": "train.bin"},
        {"split": "val", "tokens": meta["val_tokens"], "file": "val.bin"},
        {"split": "total", "tokens": meta["tokens"], "file": f"{meta['chars']} chars of {meta['name']}"},
    ]
