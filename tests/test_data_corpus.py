"""Pretraining corpus stage: exact GPT-2 token counts, uint16 memmap files, reuse and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from data.config import CorpusConfig
from data.corpus import CorpusError, prepare_corpus
from gptflow.download import fetch_source
from gptflow.storage import read_json
from gptflow.tokenizer import encode


def tokens(path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


def test_the_verdict(settings, tokenizer):
    result = prepare_corpus("the-verdict", settings=settings)
    out = result.out_dir
    assert out == settings.home / "data" / "corpus" / "the-verdict"
    meta = read_json(out / "meta.json")
    assert meta == result.report
    assert {
        k: meta[k] for k in ["chars", "tokens", "train_tokens", "val_tokens", "dtype", "vocab_size", "tokenizer"]
    } == {
        "chars": 20479,
        "tokens": 5145,
        "train_tokens": 4630,
        "val_tokens": 515,
        "dtype": "uint16",
        "vocab_size": 50257,
        "tokenizer": "gpt2",
    }
    assert meta["source_sha256"] == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
    assert (out / "train.bin").stat().st_size == 4630 * 2 and (out / "val.bin").stat().st_size == 515 * 2
    text = fetch_source("the-verdict", settings).read_text(encoding="utf-8")
    joined = np.concatenate([tokens(out / "train.bin"), tokens(out / "val.bin")])
    assert joined.tolist() == encode(tokenizer, text)
    assert tokens(out / "train.bin")[:5].tolist() == [40, 367, 2885, 1464, 1807]  # "I HAD always thought"

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_corpus("the-verdict", settings=settings)
    assert again.reused and again.report["tokens"] == 5145
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert prepare_corpus("the-verdict", CorpusConfig(val_fraction=0.2), settings).report["val_tokens"] == 1029


def test_tinyshakespeare(settings):
    meta = prepare_corpus("tinyshakespeare", settings=settings).report
    assert (meta["chars"], meta["tokens"], meta["train_tokens"], meta["val_tokens"]) == (1115394, 338025, 304222, 33803)
    assert int(tokens(settings.home / "data/corpus/tinyshakespeare/val.bin").max()) < 50257


def test_user_text_file(tmp_path, settings):
    path = tmp_path / "notes.txt"
    path.write_text("Hello, world<|endoftext|>" * 4, encoding="utf-8")
    result = prepare_corpus(str(path), settings=settings)
    assert result.out_dir.name.startswith("notes-") and len(result.out_dir.name) == len("notes-") + 8
    assert (result.report["tokens"], result.report["train_tokens"]) == (16, 14)
    assert tokens(result.out_dir / "train.bin")[:4].tolist() == [15496, 11, 995, 50256]


@pytest.mark.parametrize(
    "content, message",
    [
        ("café".encode("cp1252"), r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
        (b"  \n", r"the file holds no text, only 3 whitespace characters"),  # before: "is empty"
        (b"hi", r"1 tokens are too few to split"),
    ],
    ids=["cp1252", "empty", "too-short"],
)
def test_bad_corpus_files(tmp_path, settings, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message) as info:
        prepare_corpus(str(path), settings=settings)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\0" * 4000, "looks binary (NUL byte at offset 0); expected UTF-8 text to pretrain on"),
        (b"Hello\0world, again and again", "looks binary (NUL byte at offset 5); expected UTF-8 text to pretrain on"),
    ],
    ids=["nul-bytes", "nul-inside-text"],
)
def test_binary_corpus(tmp_path, settings, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as info:
        prepare_corpus(str(path), settings=settings)
    assert str(info.value) == f"{path}: {message}"


def test_corpus_folder(tmp_path, settings):
    with pytest.raises(CorpusError) as info:
        prepare_corpus(str(tmp_path), settings=settings)
    assert str(info.value) == f"{tmp_path}: is a folder, not a file (expected UTF-8 text to pretrain on)"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_corpus_byte_order_mark(tmp_path, settings, encoding):
    """A byte order mark names the encoding and is not text: the tokens are those of the text alone."""
    path = tmp_path / "marked.txt"
    path.write_bytes(("Hello, world<|endoftext|>" * 4).encode(encoding))
    result = prepare_corpus(str(path), settings=settings)
    assert (result.report["chars"], result.report["tokens"]) == (100, 16)
    assert tokens(result.out_dir / "train.bin")[:4].tolist() == [15496, 11, 995, 50256]


def test_unknown_corpus(settings):
    with pytest.raises(CorpusError, match=r"no-such-corpus: not a known corpus \(the-verdict, tinyshakespeare\)"):
        prepare_corpus("no-such-corpus", settings=settings)
