"""The UCI SMS Spam Collection: `label<TAB>text` lines, no header, read with quoting disabled.

With pandas' default quoting a `"` opens a quoted field and swallows the following lines: the book reads
5572 rows; the file holds 5574 (4827 ham, 747 spam).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from data.common import StageResult
from data.config import SpamDataConfig
from data.labelled import build_labelled_dataset
from gptflow.settings import Settings, get_settings
from gptflow.storage import sha256_file

STAGE = "data-spam"


def read_sms_spam(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=["label", "text"],
        quoting=csv.QUOTE_NONE,
        dtype=str,
        keep_default_na=False,
        encoding="utf-8",
    )


def spam_dir(settings: Settings) -> Path:
    return settings.home / "data" / "spam"


def prepare_spam(
    source: str | Path, config: SpamDataConfig | None = None, settings: Settings | None = None
) -> StageResult:
    """Clean, balance and split the collection file at `source` (from `fetch_source("sms-spam")`)."""
    config = config or SpamDataConfig()
    settings = settings or get_settings()
    source = Path(source)
    return build_labelled_dataset(
        spam_dir(settings),
        stage=STAGE,
        source=str(source),
        inputs={source.name: sha256_file(source)},
        config=config,
        load=lambda: (read_sms_spam(source), {"format": "tsv, no header, quoting off", "encoding": "utf-8"}),
        settings=settings,
    )
