"""Pieces every data stage shares: the error type, split sizes, token-length statistics, stage results."""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from gptflow.errors import GptflowError
from gptflow.settings import Settings
from gptflow.storage import read_json
from gptflow.tokenizer import ENDOFTEXT, get_tokenizer

SPLITS = ("train", "validation", "test")


class DataError(GptflowError, ValueError):
    """An input data file is missing, unreadable or not in the expected shape; the message names it."""


def require_file(path: Path, error: type[DataError], expected: str) -> None:
    """Refuse a missing path or a folder before anything reads or hashes it; `expected` says what should be there."""
    if path.is_dir():
        raise error(f"{path}: is a folder, not a file (expected {expected})")
    if not path.is_file():
        raise error(f"{path}: no such file (expected {expected})")


def unicode_encoding(path: Path, data: bytes, error: type[DataError], expected: str) -> str | None:
    """The encoding a byte order mark declares (utf-8-sig, utf-16), else None; refuses binary data.

    A NUL byte never occurs in UTF-8 or cp1252 text: without a UTF-16 byte order mark such a file is binary
    (or BOM-less UTF-16, which cannot be told from binary), so it is refused rather than read as tokens.
    """
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    nul = data.find(b"\x00")
    if nul >= 0:
        raise error(f"{path}: looks binary (NUL byte at offset {nul}); expected {expected}")
    return None


def decode_unicode(path: Path, data: bytes, error: type[DataError], expected: str) -> str:
    """`data` as text: UTF-8, or the UTF-16 a byte order mark declares; binary data and other encodings are refused."""
    encoding = unicode_encoding(path, data, error, expected) or "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        fix = (
            "it starts with a UTF-16 byte order mark but is cut short or mixed"
            if encoding == "utf-16"
            else "convert it to UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
        )
        raise error(
            f"{path}: not {encoding.removesuffix('-sig').upper()} text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); expected {expected}: {fix}"
        ) from None


def require_text(path: Path, text: str, error: type[DataError], expected: str) -> None:
    """Refuse a file with nothing to read: empty, or whitespace only (said as such: the file is not empty)."""
    if not text.strip():
        what = "is empty" if not text else f"holds no text, only {len(text)} whitespace characters"
        raise error(f"{path}: the file {what} (expected {expected})")


@dataclass
class StageResult:
    """What a data stage made (or found already made): its folder, whether it was reused, its report."""

    out_dir: Path
    reused: bool
    report: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, out_dir: Path, report_name: str = "report.json") -> "StageResult":
        return cls(out_dir=out_dir, reused=True, report=read_json(out_dir / report_name))


def floor_count(x: float) -> int:
    """floor() of a row/token count computed as n * fraction, immune to float noise."""
    return math.floor(round(x, 9))  # 0.7 * 10 is 7.000000000000001 and 0.1 * 30 is 3.0000000000000004


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, validation, test) row counts: train and validation rounded down, test takes the rest.

    1494 rows at 0.7/0.1/0.2 -> 1045/149/300 and 1100 at 0.85/0.05/0.10 -> 935/55/110, the book's sizes.
    """
    train, val = floor_count(n * fractions[0]), floor_count(n * fractions[1])
    return train, val, n - train - val


def apportion(total: int, quotas: dict[Any, float]) -> dict[Any, int]:
    """Split an integer total in proportion to `quotas`: largest remainder, ties to the larger quota
    (one more row moves a big class's share least), then key order."""
    counts = {k: floor_count(q) for k, q in quotas.items()}
    order = sorted(quotas, key=lambda k: (-round(quotas[k] - counts[k], 9), -quotas[k]))
    i = 0
    while sum(counts.values()) < total:
        counts[order[i % len(order)]] += 1
        i += 1
    return counts


def stratified_sizes(
    class_counts: dict[Any, int], fractions: tuple[float, float, float]
) -> dict[Any, tuple[int, int, int]]:
    """Per-class (train, validation, test) sizes whose split totals equal `split_sizes` of all rows."""
    _, val_total, test_total = split_sizes(sum(class_counts.values()), fractions)
    val = apportion(val_total, {c: n * fractions[1] for c, n in class_counts.items()})
    test = apportion(test_total, {c: n * fractions[2] for c, n in class_counts.items()})
    return {c: (n - val[c] - test[c], val[c], test[c]) for c, n in class_counts.items()}


def min_rows_per_split(fractions: tuple[float, float, float]) -> int:
    """Rows a class needs so that its smallest share rounds to at least one row."""
    return math.ceil(round(1 / min(fractions), 9))


def token_length_stats(texts: Iterable[str], settings: Settings) -> dict[str, float | int]:
    """p50/p95/max of GPT-2 token counts (max decides the padding length of a classifier)."""
    texts = list(texts)
    if not texts:
        return {"p50": 0, "p95": 0, "max": 0}
    tok = get_tokenizer(settings)
    lengths = np.array([len(ids) for ids in tok.encode_batch(texts, allowed_special={ENDOFTEXT}, num_threads=2)])
    p50, p95 = np.percentile(lengths, [50, 95])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "max": int(lengths.max())}
