"""A small, learnable 3-class text set for the classifier tests (deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

TOPICS = {
    "billing": ["invoice", "payment", "refund", "charged", "bank", "receipt", "price"],
    "sport": ["football", "match", "goal", "team", "coach", "score", "league"],
    "food": ["recipe", "cooking", "dinner", "pasta", "oven", "garlic", "soup"],
}
FILLER = ["the", "my", "today", "please", "about", "we", "you", "was", "and", "later", "really", "is"]


def make_texts(n_per_class: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in TOPICS.items():
        for _ in range(n_per_class):
            n = int(rng.integers(3, 12))
            picks = [words[i] if rng.random() < 0.4 else FILLER[i % len(FILLER)] for i in rng.integers(0, 7, size=n)]
            rows.append({"text": " ".join([words[int(rng.integers(0, 7))], *picks]), "label": label})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def write_splits(folder: Path, sizes: tuple[int, int, int] = (20, 5, 10)) -> Path:
    """train/validation/test.csv (label ids) + labels.json, like the data stage writes."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = {name: i for i, name in enumerate(sorted(TOPICS))}
    for seed, (split, n) in enumerate(zip(("train", "validation", "test"), sizes)):
        df = make_texts(n, seed)
        df.assign(label=df["label"].map(ids)).to_csv(folder / f"{split}.csv", index=False)
    (folder / "labels.json").write_text(json.dumps(ids))
    return folder
