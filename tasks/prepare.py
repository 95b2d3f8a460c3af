"""Prefect tasks of the data stages: fetch an input, build a data set, log and publish its counts.

Caching: the stage folder's manifest is the cache. It is keyed on the input files' sha256 and the config,
which a Prefect input hash is not (a user's CSV path stays the same string when the file changes), so the
tasks run every time (NO_CACHE) and the stage functions return at once when their manifest matches.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from data import corpus, instructions, labelled, spam, tabular
from data.common import StageResult
from data.config import CorpusConfig, CsvDataConfig, InstructionDataConfig, SpamDataConfig
from gptflow.download import fetch_source
from gptflow.sources import TransientSourceError, check_source
from tasks.artifacts import publish_table


@task(cache_policy=NO_CACHE)
def fetch_input(name: str) -> str:
    """A registered public input (mirror or verified download) -> its local path."""
    path = fetch_source(name)
    get_run_logger().info("%s -> %s", name, path)
    return str(path)


def _transient(task, task_run, state) -> bool:
    """Retry only what may pass by itself (a server down, a timeout), not a missing file or a 404."""
    try:
        state.result()
    except TransientSourceError:
        return True
    except Exception:
        return False
    return False


@task(
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_condition_fn=_transient,
)
def check_data_source(role: str, ref: str) -> dict:
    """One input of the run checked for new content (gptflow.sources): where to read it and what changed."""
    check = check_source(role, ref, flow_run.get_name() or "local")
    get_run_logger().info("%s data %s: %s", role, ref, check.note)
    return check.to_dict()


def _labelled_outcome(result: StageResult, key: str) -> dict:
    report, logger = result.report, get_run_logger()
    state = "reused" if result.reused else "built"
    logger.info("%s %s: labels %s", state, result.out_dir, report["labels"])
    logger.info("cleaning: %s", report["cleaning"])
    logger.info(
        "balance (%s): %s -> %s, %d unused rows",
        report["balance"]["method"],
        report["balance"]["before"],
        report["balance"]["after"],
        report["balance"]["unused_rows"],
    )
    logger.info("splits: %s", {s: c["total"] for s, c in report["splits"].items()})
    publish_table(labelled.summary_rows(report), f"{key}-splits", f"{key}: rows per class and split")
    publish_table(
        [{"step": k, "rows": v} for k, v in report["cleaning"].items()],
        f"{key}-cleaning",
        f"{key}: rows at each cleaning step",
    )
    return {"out_dir": str(result.out_dir), "reused": result.reused, "report": report}


@task(cache_policy=NO_CACHE)
def build_spam_data(source: str, config: SpamDataConfig) -> dict:
    return _labelled_outcome(spam.prepare_spam(source, config), "data-spam")


@task(cache_policy=NO_CACHE)
def build_csv_data(path: str, config: CsvDataConfig) -> dict:
    result = tabular.prepare_csv(path, config)
    read, logger = result.report["read"], get_run_logger()
    if read["encoding"] == "cp1252":
        logger.warning("%s is not UTF-8: read as cp1252 (Windows latin-1); check accents", path)
    if read["spilled_texts_rejoined"]:
        logger.warning("%s: %s", path, tabular.rejoined_note(read))
    return _labelled_outcome(result, f"data-{result.out_dir.name}")


@task(cache_policy=NO_CACHE)
def build_instruction_data(path: str, config: InstructionDataConfig, default: bool) -> dict:
    result = instructions.prepare_instructions(path, config, default=default)
    report, logger = result.report, get_run_logger()
    logger.info("%s %s", "reused" if result.reused else "built", result.out_dir)
    logger.info("cleaning: %s", report["cleaning"])
    logger.info("splits: %s", report["splits"])
    key = f"data-{result.out_dir.name}"
    publish_table(instructions.summary_rows(report), key, f"{key}: entries per split")
    return {"out_dir": str(result.out_dir), "reused": result.reused, "report": report}


@task(cache_policy=NO_CACHE)
def build_corpus(name_or_path: str, config: CorpusConfig) -> dict:
    result = corpus.prepare_corpus(name_or_path, config)
    meta = result.report
    get_run_logger().info(
        "%s %s: %d tokens (train %d, val %d)",
        "reused" if result.reused else "built",
        result.out_dir,
        meta["tokens"],
        meta["train_tokens"],
        meta["val_tokens"],
    )
    key = f"data-corpus-{meta['name']}"
    publish_table(corpus.summary_rows(meta), key, f"{key}: GPT-2 tokens per split")
    return {"out_dir": str(result.out_dir), "reused": result.reused, "report": meta}
