"""Prefect tasks: the unit of retry, caching and observability. Each calls plain functions from the
base layer (`gptflow`), `model` or `eval`, logs with the run logger and publishes artifacts."""
