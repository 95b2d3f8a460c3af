"""Clean, balance and split a labelled text set: shared by the SMS spam stage and a user's CSV.

Every row dropped is counted in the report. Texts are unique after cleaning (exact duplicates dropped,
texts carrying several labels dropped), so no text can land in two splits nor in a split and `unused.csv`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data.common import (
    SPLITS,
    DataError,
    StageResult,
    min_rows_per_split,
    stratified_sizes,
    token_length_stats,
)
from data.config import LabelledDataConfig
from gptflow.settings import Settings
from gptflow.stage import Built, Stage
from gptflow.storage import atomic_path, write_json_atomic

OUTPUTS = ["train.csv", "validation.csv", "test.csv", "labels.json", "unused.csv", "report.json"]
_WHITESPACE = re.compile(r"\s+")


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """`df` has string columns text, label. Returns the cleaned rows and a count for every step."""
    counts = {"rows_read": len(df)}
    text = df["text"].map(lambda t: _WHITESPACE.sub(" ", t).strip())
    counts["texts_whitespace_normalized"] = int((text != df["text"]).sum())
    label = df["label"].str.strip().str.lower()
    counts["labels_case_normalized"] = int((label != df["label"]).sum())
    df = pd.DataFrame({"text": text, "label": label})

    empty_text = df["text"] == ""
    counts["empty_texts_dropped"] = int(empty_text.sum())
    df = df[~empty_text]
    empty_label = df["label"] == ""
    counts["empty_labels_dropped"] = int(empty_label.sum())
    df = df[~empty_label]

    before = len(df)
    df = df.drop_duplicates(["text", "label"])
    counts["duplicates_dropped"] = before - len(df)

    labels_per_text = df.groupby("text")["label"].transform("nunique")
    conflicting = labels_per_text > 1
    counts["conflicting_texts"] = int(df.loc[conflicting, "text"].nunique())
    counts["conflicting_rows_dropped"] = int(conflicting.sum())
    df = df[~conflicting].reset_index(drop=True)
    counts["rows_clean"] = len(df)
    return df, counts


def label_ids(labels) -> dict[str, int]:
    """Sorted label names -> 0..K-1 (ham=0, spam=1); labels that are all integers sort numerically."""
    names = sorted(set(labels))
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names.sort(key=int)
    return {name: i for i, name in enumerate(names)}


def balance(
    df: pd.DataFrame, config: LabelledDataConfig, rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, unused): `undersample` cuts every class to the smallest class's size at random."""
    if config.balance == "none":
        return df, df.iloc[:0]
    smallest = int(df["label"].value_counts().min())
    keep = np.zeros(len(df), dtype=bool)
    for _, index in sorted(df.groupby("label").indices.items()):
        keep[rng.permutation(index)[:smallest]] = True
    return df[keep], df[~keep]


def check_class_sizes(class_counts: dict[str, int], config: LabelledDataConfig, source: str) -> None:
    """Every class must reach every split. Undersampling cuts every class to the smallest one's size, so then
    the class to name is the smallest, whichever class the split would leave empty."""
    undersample = config.balance == "undersample"
    kept = {name: min(class_counts.values()) for name in class_counts} if undersample else class_counts
    short = [name for name, sizes in stratified_sizes(kept, config.fractions).items() if min(sizes) < 1]
    if short:
        name = min(class_counts if undersample else short, key=class_counts.__getitem__)
        raise DataError(
            f"{source}: class {name!r} has only {class_counts[name]} row(s) after cleaning"
            f"{' (balancing cuts every class to that size)' if undersample else ''}: too few to appear in "
            f"train, validation and test at fractions {'/'.join(f'{f:g}' for f in config.fractions)} "
            f"(each class needs at least {min_rows_per_split(config.fractions)} rows)"
        )


def split(df: pd.DataFrame, config: LabelledDataConfig, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Stratified random split (`check_class_sizes` has made sure every class reaches every split)."""
    sizes = stratified_sizes(dict(sorted(df["label"].value_counts().items())), config.fractions)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    groups = df.groupby("label").indices
    for name, (n_train, n_val, _) in sizes.items():
        order = rng.permutation(groups[name])
        parts["train"].append(order[:n_train])
        parts["validation"].append(order[n_train : n_train + n_val])
        parts["test"].append(order[n_train + n_val :])
    return {s: df.iloc[rng.permutation(np.concatenate(parts[s]))].reset_index(drop=True) for s in SPLITS}


def class_counts_by_split(splits: dict[str, pd.DataFrame], ids: dict[str, int]) -> dict[str, dict[str, int]]:
    table = {}
    for name, part in splits.items():
        counts = part["label"].value_counts()
        table[name] = {label: int(counts.get(label, 0)) for label in ids} | {"total": len(part)}
    return table


def _write_csv(df: pd.DataFrame, ids: dict[str, int], path: Path) -> None:
    out = pd.DataFrame({"text": df["text"], "label": df["label"].map(ids).astype("int64")})
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, encoding="utf-8", lineterminator="\n")


def build_labelled_dataset(
    out_dir: Path,
    *,
    stage: str,
    source: str,
    inputs: dict[str, str],
    config: LabelledDataConfig,
    load: Callable[[], tuple[pd.DataFrame, dict]],
    settings: Settings,
) -> StageResult:
    """Run load -> clean -> balance -> split -> write, unless `out_dir` already holds this exact result.

    `load` returns (rows with string columns text, label; facts about reading the file for the report).
    `source` names the input in error messages.
    """
    declared = Stage.declare(stage, inputs=inputs, config=config, code=__name__, folder=out_dir)
    result = declared.run(lambda decision: _build(out_dir, stage, source, config, load, settings))
    return StageResult.from_folder(out_dir) if result.reused else StageResult(out_dir, False, result.value)


def _build(
    out_dir: Path,
    stage: str,
    source: str,
    config: LabelledDataConfig,
    load: Callable[[], tuple[pd.DataFrame, dict]],
    settings: Settings,
) -> Built:
    raw, read_facts = load()
    cleaned, cleaning = clean(raw)
    ids = label_ids(cleaned["label"])
    if not ids:
        raise DataError(
            f"{source}: no labelled rows ({cleaning['rows_read']} read, none with both a text "
            "and a label); expected a header row and at least 2 classes of labelled rows"
        )
    if len(ids) < 2:
        raise DataError(
            f"{source}: a classifier needs at least 2 classes; after cleaning the labels hold only "
            f"{next(iter(ids))!r} ({cleaning['rows_clean']} rows)"
        )
    before = {k: int(v) for k, v in sorted(cleaned["label"].value_counts().items())}
    check_class_sizes(before, config, source)
    rng = np.random.default_rng(config.seed)
    kept, unused = balance(cleaned, config, rng)
    splits = split(kept, config, rng)

    report = {
        "stage": stage,
        "source": source,
        "read": read_facts,
        "raw_class_counts": {k: int(v) for k, v in sorted(raw["label"].value_counts().items())},
        "cleaning": cleaning,
        "labels": ids,
        "balance": {
            "method": config.balance,
            "before": before,
            "after": {k: int(v) for k, v in sorted(kept["label"].value_counts().items())},
            "unused_rows": len(unused),
        },
        "splits": class_counts_by_split(splits, ids),
        "token_lengths": {s: token_length_stats(part["text"], settings) for s, part in splits.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        _write_csv(part, ids, out_dir / f"{name}.csv")
    _write_csv(unused, ids, out_dir / "unused.csv")
    write_json_atomic(out_dir / "labels.json", ids)
    write_json_atomic(out_dir / "report.json", report)
    return Built(OUTPUTS, {s: c["total"] for s, c in report["splits"].items()}, report)


def summary_rows(report: dict) -> list[dict]:
    """The report as table rows (split x class counts plus token lengths), for the CLI and Prefect UI."""
    rows = []
    for name, counts in report["splits"].items():
        lengths = report["token_lengths"][name]
        rows.append(
            {
                "split": name,
                **counts,
                "tokens_p50": lengths["p50"],
                "tokens_p95": lengths["p95"],
                "tokens_max": lengths["max"],
            }
        )
    rows.append({"split": "unused", "total": report["balance"]["unused_rows"]})
    return rows
