"""Instruction data stage: the book's 1100 entries, seeded split, cleaning counts, validation errors."""

from __future__ import annotations

import json

import pytest

from data.config import InstructionDataConfig
from data.instructions import InstructionDataError, clean, prepare_instructions
from gptflow.download import fetch_source
from gptflow.storage import read_json

SPLIT_FILES = ["train.json", "validation.json", "test.json"]


@pytest.fixture
def source(settings):
    return fetch_source("instruction-data", settings)


def key(entry: dict) -> tuple:
    return entry["instruction"], entry["input"], entry["output"]


def test_book_instructions(source, settings):
    result = prepare_instructions(source, settings=settings, default=True)
    assert result.out_dir == settings.home / "data" / "instructions"
    assert result.report["cleaning"] == {
        "entries_read": 1100,
        "fields_stripped": 0,
        "empty_outputs_dropped": 0,
        "duplicates_dropped": 0,
        "entries_clean": 1100,
        "entries_with_input": 325,
    }
    assert result.report["splits"] == {"train": 935, "validation": 55, "test": 110}
    assert result.report["token_lengths"]["train"]["max"] == 62
    parts = {name: read_json(result.out_dir / name) for name in SPLIT_FILES}
    assert [len(p) for p in parts.values()] == [935, 55, 110]
    assert all(set(e) == {"instruction", "input", "output"} for p in parts.values() for e in p)
    keys = [key(e) for p in parts.values() for e in p]
    original = json.loads(source.read_text())
    assert len(set(keys)) == 1100 and set(keys) == {key({"input": "", **e}) for e in original}
    assert parts["train.json"][0] != original[0]  # shuffled


def test_instructions_deterministic_reused_and_book_order(source, settings, tmp_path):
    first = prepare_instructions(source, settings=settings).out_dir
    assert first.name == "instructions-instruction-data-7e09a9af"  # a given file gets its own folder
    other = prepare_instructions(source, settings=settings.model_copy(update={"home": tmp_path / "o"})).out_dir
    for name in SPLIT_FILES:
        assert (first / name).read_bytes() == (other / name).read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert prepare_instructions(source, settings=settings).reused
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == mtimes

    book = prepare_instructions(source, InstructionDataConfig(book_split=True), settings)
    assert book.report["splits"] == {"train": 935, "validation": 55, "test": 110}
    original = [key({"input": "", **e}) for e in json.loads(source.read_text())]
    assert [key(e) for e in read_json(book.out_dir / "train.json")] == original[:935]
    assert [key(e) for e in read_json(book.out_dir / "test.json")] == original[935:1045]
    assert [key(e) for e in read_json(book.out_dir / "validation.json")] == original[1045:]


def test_clean_counts():
    entries = [
        {"instruction": " Add ", "input": "1, 2", "output": "3 "},
        {"instruction": "Add", "input": "1, 2", "output": "3"},
        {"instruction": "Say hi", "output": "   "},
        {"instruction": "Say hi", "output": "hi"},
    ]
    kept, counts = clean(entries)
    assert counts == {
        "entries_read": 4,
        "fields_stripped": 2,
        "empty_outputs_dropped": 1,
        "duplicates_dropped": 1,
        "entries_clean": 2,
        "entries_with_input": 1,
    }
    assert kept == [
        {"instruction": "Add", "input": "1, 2", "output": "3"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"not valid JSON \(line 1, column 2"),
        ('{"instruction": "x"}', r"expected a non-empty JSON list .* got dict"),
        ("[]", r"got an empty list"),
        (
            json.dumps(
                [{"instruction": "a", "output": "b"}] * 3
                + [{"instruction": 1, "output": "b"}]
                + [{"instruction": "a"}] * 12
                + ["text", {"instruction": "a", "input": None, "output": "b"}]
            ),
            r"15 of 18 entries are not .*: indices 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and 5 more "
            r"\(entry 3 'instruction' is a int, not a string\)",
        ),
        (json.dumps([{"instruction": "a", "output": "b"}]), r"1 entries after cleaning are too few"),
    ],
    ids=["json", "not-list", "empty", "bad-entries", "too-few"],
)
def test_bad_instruction_files(tmp_path, settings, content, message):
    path = tmp_path / "mine.json"
    path.write_text(content)
    with pytest.raises(InstructionDataError, match=message) as info:
        prepare_instructions(path, settings=settings)
    assert str(path) in str(info.value)


ENTRIES = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(20)]


@pytest.mark.parametrize(
    "name, content",
    [
        ("bom.json", "\ufeff" + json.dumps(ENTRIES, indent=1)),
        ("lines.jsonl", "".join(json.dumps(e) + "\n" for e in ENTRIES)),
        (
            "lines.json",
            "\n".join(json.dumps(e) for e in ENTRIES[:10]) + "\n\n" + "\n".join(map(json.dumps, ENTRIES[10:])),
        ),
        ("bom-lines.jsonl", "\ufeff" + "\r\n".join(json.dumps(e) for e in ENTRIES)),
    ],
    ids=["utf8-bom", "jsonl", "json-lines-by-content", "jsonl-bom-crlf"],
)
def test_bom_and_json_lines_are_read(tmp_path, settings, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8"))
    result = prepare_instructions(path, settings=settings)
    assert result.report["cleaning"]["entries_read"] == 20
    assert result.report["splits"] == {"train": 17, "validation": 1, "test": 2}
    parts = [e for name in SPLIT_FILES for e in read_json(result.out_dir / name)]
    assert sorted(parts, key=lambda e: int(e["output"])) == ENTRIES


EXPECTED = "a non-empty JSON list (or JSON Lines) of {instruction, input, output} objects"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.json", b" \n", f"the file holds no text, only 2 whitespace characters (expected {EXPECTED})"),
        ("zeros.json", b"\0" * 64, f"looks binary (NUL byte at offset 0); expected {EXPECTED}"),
        (
            "latin.json",
            '[{"instruction": "café", "output": "x"}]'.encode("cp1252"),
            f"not UTF-8 text (byte 0xe9 at offset 21); expected {EXPECTED}: convert it to UTF-8 (e.g. iconv -f "
            "cp1252 -t utf-8)",
        ),
        ("object.json", b'{"instruction": "a", "output": "b"}', f"expected {EXPECTED}, got dict"),
        (
            "one.JSONL",
            b'{"instruction": "a", "output": "b"}\n',
            "1 entries after cleaning are too few for a train/validation/test split at fractions 0.85/0.05/0.1",
        ),
        (
            "broken.jsonl",
            b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n',
            "line 2 is not valid JSON (column 32: Expecting value); expected one {instruction, input, output} "
            "object per line (JSON Lines)",
        ),
        (
            "broken-lines.json",
            b'{"instruction": "a", "output": "b"}\n\n{"instruction": "c"\n',
            "line 3 is not valid JSON (column 20: Expecting ',' delimiter); expected one {instruction, input, "
            "output} object per line (JSON Lines)",
        ),
        ("trailing.json", b'[{"instruction": "a", "output": "b"}] x', "not valid JSON (line 1, column 39: Extra data)"),
        (
            "fields.jsonl",
            b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ["b"]}\n{"output": "c"}\n',
            "2 of 3 entries are not {instruction: str, input: str (optional), output: str} objects: indices 1, 2 "
            "(entry 1 'output' is a list, not a string)",
        ),
    ],
    ids=[
        "empty",
        "nul-bytes",
        "cp1252",
        "object",
        "one-line-jsonl",
        "jsonl-bad-line",
        "json-lines-bad-line",
        "extra-data",
        "fields",
    ],
)
def test_odd_instruction_files(tmp_path, settings, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InstructionDataError) as info:
        prepare_instructions(path, settings=settings)
    assert str(info.value) == f"{path}: {message}"


def test_missing_instruction_file_and_folder(tmp_path, settings):
    for path, problem in [(tmp_path / "nope.json", "no such file"), (tmp_path, "is a folder, not a file")]:
        with pytest.raises(InstructionDataError) as info:
            prepare_instructions(path, settings=settings)
        assert str(info.value) == f"{path}: {problem} (expected {EXPECTED})"
