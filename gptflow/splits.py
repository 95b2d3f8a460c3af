"""The one reader of the split files the data stages write, for every layer above them.

A labelled data folder holds `labels.json` (class name -> id 0..n-1) and `train.csv`, `validation.csv`,
`test.csv` (optionally `unused.csv`), each with the columns text,label. An instructions data folder holds
`train.json`, `validation.json` and `test.json`, each a list of {instruction, input, output}. Every refusal is
one line that names the file and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptflow.errors import GptflowError

if TYPE_CHECKING:
    import pandas as pd

LABELLED_FILES = ("train.csv", "validation.csv", "test.csv", "labels.json")
INSTRUCTION_FILES = ("train.json", "validation.json", "test.json")
_PREPARE_LABELLED = "run `gptflow data spam` or `gptflow data csv` first"


class SplitError(GptflowError, ValueError):
    """A split file is missing or not what the data stage writes."""


def read_labels(folder: str | Path) -> dict[str, int]:
    """A labelled data folder's classes: name -> id, the ids 0..n-1."""
    path = Path(folder) / "labels.json"
    if not path.is_file():
        raise SplitError(f"{path} does not exist; {_PREPARE_LABELLED}")
    labels = _read_json(path, "a JSON object of class name -> id")
    if not isinstance(labels, dict) or sorted(labels.values()) != list(range(len(labels))):
        found = sorted(labels.values()) if isinstance(labels, dict) else type(labels).__name__
        raise SplitError(f"{path}: ids must be 0..{len(labels) - 1}, got {found}")
    return labels


def read_labelled(path: str | Path, labels: dict[str, int]) -> "pd.DataFrame":
    """A labelled split (columns text, label), every label one of `labels`' ids."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise SplitError(f"split file {path} does not exist; {_PREPARE_LABELLED}")
    df = pd.read_csv(path, dtype={"text": str}, keep_default_na=False)
    if list(df.columns[:2]) != ["text", "label"]:
        raise SplitError(f"{path}: expected columns text,label; found {list(df.columns)}")
    bad = ~df["label"].isin(list(labels.values()))
    if bad.any():
        raise SplitError(
            f"{path}: label {df['label'][bad].iloc[0]} (row {int(bad.idxmax()) + 2}) is not one "
            f"of the ids in labels.json {sorted(labels.values())}"
        )
    return df


def read_instructions(path: str | Path) -> list[dict[str, str]]:
    """An instruction split: a non-empty list of {instruction, input, output} entries."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path} does not exist; run `gptflow data instructions` first")
    data = _read_json(path, "a JSON file")
    bad = [
        i
        for i, e in enumerate(data if isinstance(data, list) else [None])
        if not (isinstance(e, dict) and isinstance(e.get("instruction"), str) and isinstance(e.get("output"), str))
    ]
    if not isinstance(data, list) or not data or bad:
        raise SplitError(
            f"{path}: expected a non-empty JSON list of {{instruction, input, output}} string "
            f"entries" + (f"; entries {bad[:10]} are not" if bad and isinstance(data, list) else "")
        )
    return data


def _read_json(path: Path, expected: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: not {expected} ({exc})") from None
