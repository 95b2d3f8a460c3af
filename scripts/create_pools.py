"""Create (or overwrite) the work pools listed under `definitions.work_pools` of prefect.yaml.

`make deploy` and scripts/e2e.py both run this before `prefect deploy --all`, so the pool names, types and base
job templates live in one place, next to the deployments that use them. Talks to PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import subprocess
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
    prefect = str(Path(sys.executable).with_name("prefect"))
    for name, pool in work_pools(args.prefect_file).items():
        cmd = [prefect, "work-pool", "create", name, "--type", pool["type"], "--overwrite"]
        if pool.get("base_job_template"):
            cmd += ["--base-job-template", str(REPO / pool["base_job_template"])]
        if subprocess.run(cmd, cwd=REPO).returncode != 0:
            print(f"create_pools: `{' '.join(cmd[1:])}` failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
