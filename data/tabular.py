"""A user's labelled CSV/TSV -> the same clean/balance/split as the spam set.

Reading is forgiving where a spreadsheet export varies (delimiter, BOM, UTF-16, Windows code page, line ends,
trailing unnamed columns and a last text column's unquoted commas spilled into them, quoted commas and
newlines) and strict where a guess could silently mislabel or merge rows.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from data.common import DataError, StageResult, decode_unicode, require_file, require_text, unicode_encoding
from data.config import CsvDataConfig
from gptflow.settings import Settings, get_settings
from gptflow.storage import sha256_file

if TYPE_CHECKING:
    import pandas as pd

# pandas and the labelled-data stage are imported where rows are read: `check_header`, the CLI's check before any
# flow starts, needs neither.

log = logging.getLogger(__name__)

STAGE = "data-csv"
DELIMITERS = [",", "\t", ";", "|"]
SNIFF_CHARS = 64 * 1024
_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
TEXT_TABLE = "a UTF-8 or cp1252 text CSV/TSV (UTF-16 only with its byte order mark: else save it as 'CSV UTF-8')"


class TabularError(DataError):
    """A user's CSV/TSV cannot be used; the message names the file and what was expected."""


def decode(path: Path, data: bytes, *, warn: bool = True) -> tuple[str, str]:
    """(text, encoding): UTF-8 (BOM or not) or UTF-16 with its BOM, else cp1252 with a warning (`warn`).

    cp1252 holds every printable latin-1 character, so latin-1 text decodes too; the five bytes it leaves
    undefined (0x81 0x8D 0x8F 0x90 0x9D) are control codes in latin-1, never text: such a file is another
    encoding (Shift-JIS, BOM-less UTF-16, ...) and is refused rather than read as garbage.
    """
    encoding = unicode_encoding(path, data, TabularError, TEXT_TABLE) or "utf-8"
    if encoding != "utf-8":  # a byte order mark leaves no doubt
        return decode_unicode(path, data, TabularError, TEXT_TABLE), encoding
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
    if warn:
        log.warning(
            "%s is not UTF-8 (byte 0x%02x at offset %d); read it as cp1252 (Windows latin-1)",
            path,
            data[utf8_error.start],
            utf8_error.start,
        )
    return text, "cp1252"


def _header(text: str, delimiter: str) -> list[str]:
    row = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
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


def _named_columns(path: Path, header: list[str], wanted: list[str], delimiter: str) -> list[str]:
    """The header without its trailing unnamed columns; each wanted column must appear in it exactly once."""
    named = list(header)
    while named and named[-1] == "":
        named.pop()
    missing = [c for c in wanted if c not in named]
    if missing:
        raise TabularError(
            f"{path}: no column {' or '.join(map(repr, missing))} in the header; the columns found "
            f"({_DELIMITER_NAMES[delimiter]}-separated) are {named}"
        )
    for column in wanted:
        if named.count(column) > 1:
            places = [i + 1 for i, name in enumerate(named) if name == column]
            raise TabularError(
                f"{path}: the header names column {column!r} {len(places)} times (columns {places}); "
                "rename all but one so that it is clear which one to read"
            )
    return named


def _unclosed_quote(text: str, line: int, delimiter: str) -> bool:
    """Whether the record starting at `line` opens a quote that the file never closes. The forgiving reader
    then takes the rest of the file as one field; only a strict one tells."""
    rest = io.StringIO(text, newline="").readlines()[line - 1 :]
    try:
        for _ in csv.reader(rest, delimiter=delimiter, strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def check_header(path: Path, text_column: str, label_column: str) -> list[str]:
    """What `read_table` checks before it reads a row, for a check before any flow starts (no pandas work, nothing
    logged: the stage warns of a cp1252 file when it reads it): the file exists, decodes, is not empty, and its
    header names each of the two columns once. Returns the named columns; the stage checks all of it again."""
    require_file(path, TabularError, "a CSV/TSV with a header row")
    text, _ = decode(path, path.read_bytes(), warn=False)
    require_text(path, text, TabularError, "a header row and labelled rows")
    delimiter = detect_delimiter(text, [text_column, label_column])
    try:
        header = _header(text, delimiter)
    except csv.Error as exc:
        raise TabularError(f"{path}: not a readable CSV at line 1: {exc}") from None
    return _named_columns(path, header, [text_column, label_column], delimiter)


def read_table(path: Path, text_column: str, label_column: str) -> tuple[pd.DataFrame, dict]:
    """Rows (text, label as strings) and facts about the read (encoding, delimiter, columns, rows rejoined).

    Trailing unnamed columns (a header `label,text,,,`) are dropped. Where the text column is the last named
    one, values in them are its unquoted delimiters' spill-over (`spam,"part one", part two,`): they are joined
    back into the text with the delimiter that split them, and counted.
    """
    import pandas as pd

    text, encoding = decode(path, path.read_bytes())
    require_text(path, text, TabularError, "a header row and labelled rows")
    delimiter = detect_delimiter(text, [text_column, label_column])
    delimiter_name = _DELIMITER_NAMES[delimiter]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    next_start = 1  # the line where the record being read starts
    try:
        header = [name.strip() for name in next(reader)]
        named = _named_columns(path, header, [text_column, label_column], delimiter)
        t, lab = named.index(text_column), named.index(label_column)
        spills = t == len(named) - 1 < len(header) - 1  # unnamed columns right after the text column
        texts, labels, rejoined = [], [], 0
        next_start = reader.line_num + 1
        for row in reader:
            start, next_start = next_start, reader.line_num + 1
            if not any(field.strip() for field in row):
                continue
            extra = [f for f in row[len(named) :] if f.strip()]
            if extra and (len(row) > len(header) or not spills):
                if len(row) > len(header) or len(header) == len(named):
                    unnamed = f" and {len(header) - len(named)} unnamed ones" if len(header) > len(named) else ""
                    problem = f"has {len(row)} fields but the header names {len(named)} columns{unnamed}"
                else:
                    problem = (
                        f"has values in unnamed columns after {named[-1]!r}, which only the spill-over of a "
                        f"last text column may fill ({text_column!r} is not last)"
                    )
                raise TabularError(
                    f"{path}: line {start} {problem} (extra values {extra[:3]}); quote fields that contain the "
                    f"delimiter {delimiter_name!r}"
                )
            if extra:
                spilled = row[t:]
                while not spilled[-1].strip():
                    spilled.pop()
                row = row[:t] + [delimiter.join(spilled)]
                rejoined += 1
            texts.append(row[t] if t < len(row) else "")
            labels.append(row[lab] if lab < len(row) else "")
    except csv.Error as exc:
        hint = "; a quote never closed makes one field of the rest of the file" if "field limit" in str(exc) else ""
        raise TabularError(f"{path}: not a readable CSV at line {next_start}: {exc}{hint}") from None
    if texts and _unclosed_quote(text, start, delimiter):
        raise TabularError(
            f"{path}: line {start} opens a quoted field that is never closed, so the rest of the file "
            f"(lines {start}-{reader.line_num}) would be read as one text; close the quote (a quote inside a "
            'quoted field is written "")'
        )
    facts = {
        "encoding": encoding,
        "delimiter": delimiter_name,
        "columns": named,
        "spilled_texts_rejoined": rejoined,
    }
    return pd.DataFrame({"text": texts, "label": labels}, dtype=str), facts


def rejoined_note(read_facts: dict) -> str:
    """The line the CLI and the task log print when texts were repaired (`read_table`)."""
    return (
        f"{read_facts['spilled_texts_rejoined']} row(s) held unquoted {read_facts['delimiter']}s that split the "
        "text into unnamed columns: joined back into the text"
    )


def csv_dir(path: Path, digest: str, settings: Settings) -> Path:
    return settings.home / "data" / f"csv-{path.stem}-{digest[:8]}"


def prepare_csv(path: str | Path, config: CsvDataConfig, settings: Settings | None = None) -> StageResult:
    """Clean, balance and split a user's labelled CSV/TSV into `<home>/data/csv-<stem>-<sha8>`."""
    from data.labelled import build_labelled_dataset

    settings = settings or get_settings()
    path = Path(path)
    require_file(path, TabularError, "a CSV/TSV with a header row")
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
