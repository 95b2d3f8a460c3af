"""Create (or overwrite) the work pools listed under `definitions.work_pools` of prefect.yaml.

`make deploy` and scripts/e2e.py both run this before `prefect deploy --all`, so the pool names, types and base
job templates live in one place, next to the deployments that use them. Talks to PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def work_pools(prefect_file: Path) -> dict[str, dict]:
    """Pool name -> {type, base_job_template (a path relative to the repo, optional)}."""
    return yaml.safe_load(prefect_file.read_text())["definitions"]["work_pools"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefect-file", type=Path, default=REPO / "prefect.yaml")
    args = parser.parse_args(argv)
    # One process and the client, rather than `prefect work-pool create` per pool: the same calls the CLI makes
    # (an explicit template, else the installed worker type's default), without a CLI start-up per pool.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.base import BaseWorker

    with get_client(sync_client=True) as client:
        for name, pool in work_pools(args.prefect_file).items():
            if pool.get("base_job_template"):
                template = json.loads((REPO / pool["base_job_template"]).read_text())
            else:
                worker = BaseWorker.get_worker_class_from_type(pool["type"])
                if worker is None:
                    print(
                        f"create_pools: no worker of type {pool['type']!r} is installed (pool {name})", file=sys.stderr
                    )
                    return 1
                template = worker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=name, type=pool["type"], base_job_template=template), overwrite=True
            )
            print(f"work pool {name} ({pool['type']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
