"""A user's labelled CSV/TSV -> the same clean/balance/split as the spam set.

Reading is forgiving where a spreadsheet export varies (delimiter, BOM, Windows code page, trailing empty
columns, quoted commas and newlines) and strict where a guess could silently mislabel rows.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import pandas as pd

from data.common import DataError, StageResult
from data.config import CsvDataConfig
from data.labelled import build_labelled_dataset
from gptflow.settings import Settings, get_settings
from gptflow.storage import sha256_file

log = logging.getLogger(__name__)

STAGE = "data-csv"
DELIMITERS = [",", "\t", ";", "|"]
SNIFF_CHARS = 64 * 1024
_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}


class TabularError(DataError):
    """A user's CSV/TSV cannot be used; the message names the file and what was expected."""


def decode(path: Path, data: bytes) -> tuple[str, str]:
    """(text, encoding): UTF-8 (BOM or not), else cp1252 with a warning.

    cp1252 holds every printable latin-1 character, so latin-1 text decodes too; the five bytes it leaves
    undefined (0x81 0x8D 0x8F 0x90 0x9D) are control codes in latin-1, never text: such a file is another
    encoding (Shift-JIS, UTF-16, ...) and is refused rather than read as garbage.
    """
    if not data.strip():
        raise TabularError(f"{path}: the file is empty (expected a header row and labelled rows)")
    if b"\x00" in data:
        offset = data.index(b"\x00")
        raise TabularError(
            f"{path}: looks binary (NUL byte at offset {offset}); expected a UTF-8 or cp1252 text "
            "CSV/TSV (UTF-16 exports from Excel must be saved as 'CSV UTF-8')"
        )
    if data.startswith(b"\xef\xbb\xbf"):
        encoding = "utf-8-sig"
    else:
        encoding = "utf-8"
    try:
        return data.decode(encoding), encoding
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError as exc:
        raise TabularError(
            f"{path}: unreadable encoding: not UTF-8 (invalid byte 0x{data[utf8_error.start]:02x} at offset "
            f"{utf8_error.start}) nor cp1252/latin-1 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    log.warning(
        "%s is not UTF-8 (byte 0x%02x at offset %d); read it as cp1252 (Windows latin-1)",
        path,
        data[utf8_error.start],
        utf8_error.start,
    )
    return text, "cp1252"


def _header(text: str, delimiter: str) -> list[str]:
    row = next(csv.reader(io.StringIO(text), delimiter=delimiter), [])
    return [name.strip() for name in row]


def detect_delimiter(text: str, wanted: list[str]) -> str:
    """The sniffed delimiter if its header holds the wanted columns, else the first candidate whose does.

    Sniffing alone can be fooled (free text is full of commas); the header naming both columns is not.
    With no candidate naming them, keep the best guess so the error lists what that header holds.
    """
    sample = text[:SNIFF_CHARS]
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:
        first_line = sample.splitlines()[0]
        sniffed = max(DELIMITERS, key=first_line.count)
    for delimiter in [sniffed] + [d for d in DELIMITERS if d != sniffed]:
        if set(wanted) <= set(_header(sample, delimiter)):
            return delimiter
    return sniffed


def read_table(path: Path, text_column: str, label_column: str) -> tuple[pd.DataFrame, dict]:
    """Rows (text, label as strings) and facts about the read (encoding, delimiter, rows)."""
    text, encoding = decode(path, path.read_bytes())
    delimiter = detect_delimiter(text, [text_column, label_column])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader)]
        while header and header[-1] == "":  # trailing empty unnamed columns ("a,b,,")
            header.pop()
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise TabularError(
                f"{path}: no column {' or '.join(map(repr, missing))} in the header; the columns found "
                f"({_DELIMITER_NAMES[delimiter]}-separated) are {header}"
            )
        t, lab = header.index(text_column), header.index(label_column)
        texts, labels = [], []
        for row in reader:
            if not any(field.strip() for field in row):
                continue
            extra = [f for f in row[len(header) :] if f.strip()]
            if extra:
                raise TabularError(
                    f"{path}: line {reader.line_num} has {len(row)} fields but the header names "
                    f"{len(header)} columns (extra values {extra[:3]}); quote fields that contain "
                    f"the delimiter {_DELIMITER_NAMES[delimiter]!r}"
                )
            texts.append(row[t] if t < len(row) else "")
            labels.append(row[lab] if lab < len(row) else "")
    except csv.Error as exc:
        raise TabularError(f"{path}: not a readable CSV at line {reader.line_num}: {exc}") from None
    facts = {"encoding": encoding, "delimiter": _DELIMITER_NAMES[delimiter], "columns": header}
    return pd.DataFrame({"text": texts, "label": labels}, dtype=str), facts


def csv_dir(path: Path, digest: str, settings: Settings) -> Path:
    return settings.home / "data" / f"csv-{path.stem}-{digest[:8]}"


def prepare_csv(path: str | Path, config: CsvDataConfig, settings: Settings | None = None) -> StageResult:
    """Clean, balance and split a user's labelled CSV/TSV into `<home>/data/csv-<stem>-<sha8>`."""
    settings = settings or get_settings()
    path = Path(path)
    if not path.is_file():
        raise TabularError(f"{path}: no such file (expected a CSV/TSV with a header row)")
    digest = sha256_file(path)
    return build_labelled_dataset(
        csv_dir(path, digest, settings),
        stage=STAGE,
        source=str(path),
        inputs={path.name: digest},
        config=config,
        load=lambda: read_table(path, config.text_column, config.label_column),
        settings=settings,
    )
