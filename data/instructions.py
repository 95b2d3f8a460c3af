"""Instruction/response pairs (`instruction`, optional `input`, `output`) -> train/validation/test JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.common import (
    DataError,
    StageResult,
    decode_unicode,
    floor_count,
    require_file,
    require_text,
    split_sizes,
    token_length_stats,
)
from data.config import InstructionDataConfig
from gptflow.settings import Settings, get_settings
from gptflow.stage import Built, Stage
from gptflow.storage import sha256_file, write_json_atomic

STAGE = "data-instructions"
OUTPUTS = ["train.json", "validation.json", "test.json", "report.json"]
FIELDS = ("instruction", "input", "output")
SHOW_INDICES = 10
EXPECTED = "a non-empty JSON list (or JSON Lines) of {instruction, input, output} objects"


class InstructionDataError(DataError):
    """An instruction file is not a JSON list (or JSON Lines) of {instruction, input?, output} string entries."""


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    for key in ("instruction", "output"):
        if key not in entry:
            return f"has no {key!r}"
        if not isinstance(entry[key], str):
            return f"{key!r} is a {type(entry[key]).__name__}, not a string"
    if "input" in entry and not isinstance(entry["input"], str):
        return f"'input' is a {type(entry['input']).__name__}, not a string"
    return None


def _json_lines(path: Path, text: str) -> list:
    """One JSON value per non-blank line (JSON Lines); an error names the line."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InstructionDataError(
                    f"{path}: line {number} is not valid JSON (column {exc.colno}: {exc.msg}); expected one "
                    "{instruction, input, output} object per line (JSON Lines)"
                ) from None
    return entries


def _parse(path: Path):
    """A JSON document, or the list of a JSON Lines file's values (a `.jsonl` file, or a file whose second value
    starts a new line); an empty file, binary data and text not UTF-8 (a BOM is fine) are refused."""
    text = decode_unicode(path, path.read_bytes(), InstructionDataError, EXPECTED)
    require_text(path, text, InstructionDataError, EXPECTED)
    if path.suffix.lower() == ".jsonl":
        return _json_lines(path, text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and exc.colno == 1:  # a second value starts a line: JSON Lines
            return _json_lines(path, text)
        raise InstructionDataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None


def load_instructions(path: Path) -> list[dict]:
    """Parse and validate; an error lists the offending entry indices (the first few) and the first problem."""
    data = _parse(path)
    if not isinstance(data, list) or not data:
        raise InstructionDataError(
            f"{path}: expected {EXPECTED}, got {'an empty list' if data == [] else type(data).__name__}"
        )
    problems = [(i, p) for i, entry in enumerate(data) if (p := _entry_problem(entry))]
    if problems:
        shown = ", ".join(str(i) for i, _ in problems[:SHOW_INDICES])
        more = f" and {len(problems) - SHOW_INDICES} more" if len(problems) > SHOW_INDICES else ""
        first_i, first_p = problems[0]
        raise InstructionDataError(
            f"{path}: {len(problems)} of {len(data)} entries are not {{instruction: str, input: str "
            f"(optional), output: str}} objects: indices {shown}{more} (entry {first_i} {first_p})"
        )
    return data


def clean(entries: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Strip every field, drop entries with an empty output, drop exact duplicates (first one kept)."""
    counts = {"entries_read": len(entries)}
    stripped = [{k: e.get(k, "").strip() for k in FIELDS} for e in entries]
    counts["fields_stripped"] = sum(any(s[k] != e.get(k, "") for k in FIELDS) for s, e in zip(stripped, entries))
    kept = [e for e in stripped if e["output"]]
    counts["empty_outputs_dropped"] = len(stripped) - len(kept)
    unique = list({tuple(e[k] for k in FIELDS): e for e in reversed(kept)}.values())[::-1]
    counts["duplicates_dropped"] = len(kept) - len(unique)
    counts["entries_clean"] = len(unique)
    counts["entries_with_input"] = sum(bool(e["input"]) for e in unique)
    return unique, counts


def split_entries(entries: list[dict], config: InstructionDataConfig) -> dict[str, list[dict]]:
    """Seeded shuffle then train/validation/test; or the book's file-order train/test/validation slices."""
    n = len(entries)
    if config.book_split:
        n_train, n_test = floor_count(n * config.fractions[0]), floor_count(n * config.fractions[2])
        return {
            "train": entries[:n_train],
            "validation": entries[n_train + n_test :],
            "test": entries[n_train : n_train + n_test],
        }
    shuffled = [entries[i] for i in np.random.default_rng(config.seed).permutation(n)]
    n_train, n_val, _ = split_sizes(n, config.fractions)
    return {
        "train": shuffled[:n_train],
        "validation": shuffled[n_train : n_train + n_val],
        "test": shuffled[n_train + n_val :],
    }


def checked_splits(path: Path, entries: list[dict], config: InstructionDataConfig) -> dict[str, list[dict]]:
    """`split_entries`, refusing a split that leaves a part empty."""
    splits = split_entries(entries, config)
    if min(len(part) for part in splits.values()) < 1:
        raise InstructionDataError(
            f"{path}: {len(entries)} entries after cleaning are too few for a train/validation/test split "
            f"at fractions {'/'.join(f'{f:g}' for f in config.fractions)}"
        )
    return splits


def check_instructions(path: str | Path, config: InstructionDataConfig | None = None) -> None:
    """What `prepare_instructions` checks of a file before it writes anything, for a check before any flow starts:
    the file exists, parses, holds valid entries, and enough of them after cleaning for the split. The stage
    checks it all again when it reads the file."""
    path = Path(path)
    require_file(path, InstructionDataError, EXPECTED)
    checked_splits(path, clean(load_instructions(path))[0], config or InstructionDataConfig())


def instructions_dir(path: Path, digest: str, settings: Settings, default: bool) -> Path:
    name = "instructions" if default else f"instructions-{path.stem}-{digest[:8]}"
    return settings.home / "data" / name


def prepare_instructions(
    path: str | Path,
    config: InstructionDataConfig | None = None,
    settings: Settings | None = None,
    *,
    default: bool = False,
) -> StageResult:
    """Validate, clean and split an instruction file. `default`: the book's file (`<home>/data/instructions`)."""
    config = config or InstructionDataConfig()
    settings = settings or get_settings()
    path = Path(path)
    require_file(path, InstructionDataError, EXPECTED)
    digest = sha256_file(path)
    out_dir = instructions_dir(path, digest, settings, default)
    stage = Stage.declare(STAGE, inputs={path.name: digest}, config=config, code=__name__, folder=out_dir)
    result = stage.run(lambda decision: _build(path, out_dir, config, settings))
    return StageResult.from_folder(out_dir) if result.reused else StageResult(out_dir, False, result.value)


def _build(path: Path, out_dir: Path, config: InstructionDataConfig, settings: Settings) -> Built:
    entries, cleaning = clean(load_instructions(path))
    splits = checked_splits(path, entries, config)

    report = {
        "stage": STAGE,
        "source": str(path),
        "cleaning": cleaning,
        "splits": {s: len(part) for s, part in splits.items()},
        # tokens of instruction, input and output joined by newlines, before any prompt template
        "token_lengths": {
            s: token_length_stats(("\n".join(e[k] for k in FIELDS if e[k]) for e in part), settings)
            for s, part in splits.items()
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        write_json_atomic(out_dir / f"{name}.json", part)
    write_json_atomic(out_dir / "report.json", report)
    return Built(OUTPUTS, report["splits"], report)


def summary_rows(report: dict) -> list[dict]:
    return [
        {"split": s, "entries": n, **{f"tokens_{k}": v for k, v in report["token_lengths"][s].items()}}
        for s, n in report["splits"].items()
    ]
