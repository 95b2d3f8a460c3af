"""Data flows: each fetches its input and builds one data set under `<home>/data/`.

Each returns {"out_dir", "reused", "report"}; the report holds every count (see data).
"""

from __future__ import annotations

from prefect import flow

from data.config import CorpusConfig, CsvDataConfig, InstructionDataConfig, SpamDataConfig
from tasks.prepare import build_corpus, build_csv_data, build_instruction_data, build_spam_data, fetch_input


@flow(name="prepare-spam")
def prepare_spam(config: SpamDataConfig = SpamDataConfig()) -> dict:
    """UCI SMS Spam Collection -> cleaned, balanced, stratified train/validation/test CSVs."""
    source = fetch_input("sms-spam")
    return build_spam_data(source, config)


@flow(name="prepare-csv")
def prepare_csv(path: str, config: CsvDataConfig) -> dict:
    """A user's labelled CSV/TSV -> the same clean/balance/split as the spam set."""
    return build_csv_data(path, config)


@flow(name="prepare-instructions")
def prepare_instructions(path: str | None = None, config: InstructionDataConfig = InstructionDataConfig()) -> dict:
    """instruction-data.json (or a file of the same shape) -> train/validation/test JSON."""
    source = path or fetch_input("instruction-data")
    return build_instruction_data(source, config, default=path is None)


@flow(name="prepare-corpus")
def prepare_corpus(corpus: str = "the-verdict", config: CorpusConfig = CorpusConfig()) -> dict:
    """the-verdict, tinyshakespeare or a UTF-8 text file -> uint16 GPT-2 token files for pretraining."""
    return build_corpus(corpus, config)
