"""The Prefect API half of the end-to-end check (scripts/e2e.py): what one deployment's run is given and must
produce, and the checks of its deployments, flow runs, subflows, task runs and artifacts through the API."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any

from e2e_harness import PNG_DATA_URL, E2EError, Service, log


@dataclass(frozen=True)
class Expectation:
    """What one deployment's e2e run is given and must produce."""

    parameters: dict[str, Any]
    subflows: set[str] = field(default_factory=set)  # flow names of subflow runs
    tasks: set[str] = field(default_factory=set)  # task names (the run name without its "-xyz" suffix)
    artifacts: set[str] = field(default_factory=set)  # artifact keys (fnmatch patterns)
    min_plots: int = 1


def deployment_checks(client, spec: dict) -> dict[str, Any]:
    """Every deployment of prefect.yaml exists on its work pool with its schedules; returns name -> deployment."""
    found = {d.name: d for d in client.read_deployments()}
    problems = []
    for want in spec["deployments"]:
        got = found.get(want["name"])
        if got is None:
            problems.append(f"deployment {want['name']!r} missing")
            continue
        if got.work_pool_name != want["work_pool"]["name"]:
            problems.append(f"{want['name']}: work pool {got.work_pool_name!r}, expected {want['work_pool']['name']!r}")
        crons = sorted((s.schedule.cron, s.schedule.timezone) for s in got.schedules)
        expected = sorted((s["cron"], s.get("timezone", "UTC")) for s in want.get("schedules") or [])
        if crons != expected:
            problems.append(f"{want['name']}: schedules {crons}, expected {expected}")
    if problems:
        raise E2EError("; ".join(problems))
    return found


def wait_for_run(client, run_id, worker: Service, timeout_s: float):
    from prefect.states import Cancelling

    start, last = time.monotonic(), None
    while True:
        run = client.read_flow_run(run_id)
        if run.state_name != last:
            log(f"flow run {run.name}: {run.state_name}")
            last = run.state_name
        if run.state and run.state.is_final():
            return run
        if not worker.alive():
            raise E2EError(f"the worker exited while the run was {run.state_name}:\n{worker.tail()}")
        if time.monotonic() - start > timeout_s:
            client.set_flow_run_state(run_id, Cancelling(), force=True)
            raise E2EError(
                f"flow run {run.name} still {run.state_name} after {timeout_s:.0f}s (cancelled); "
                f"worker log tail:\n{worker.tail()}"
            )
        time.sleep(2)


def run_tree(client, run) -> tuple[list, list, list]:
    """`run`'s flow runs (it and its subflows at any depth), their task runs and their artifacts."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    runs, tasks, frontier = [], [], [run]
    while frontier:
        current = frontier.pop()
        runs.append(current)
        only = FlowRunFilter(id=FlowRunFilterId(any_=[current.id]))
        tasks += client.read_task_runs(flow_run_filter=only)
        children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[current.id]))
        frontier += client.read_flow_runs(flow_run_filter=children)
    ids = [r.id for r in runs]
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    return runs, tasks, [a for a in artifacts if a.key]


def run_checks(client, run, expect: Expectation) -> dict[str, Any]:
    """The run tree (the run and its subflows) Completed, with the expected subflows, task runs, artifacts."""
    problems = []
    if not run.state.is_completed():
        problems.append(f"flow run {run.name} ended {run.state_name}: {run.state.message}")
    runs, tasks, artifacts = run_tree(client, run)
    flow_names = {f.id: f.name for f in client.read_flows()}
    subflows = [r for r in runs if r.id != run.id]
    for r in runs:
        if not r.state.is_completed():
            problems.append(f"flow run {r.name} ({flow_names.get(r.flow_id)}) ended {r.state_name}")
    for t in tasks:
        if not t.state.is_completed():
            problems.append(f"task run {t.name} ended {t.state_name}: {t.state.message}")
    subflow_names = {flow_names.get(r.flow_id) for r in subflows}
    task_names = {t.name.rsplit("-", 1)[0] for t in tasks}
    if missing := expect.subflows - subflow_names:
        problems.append(f"no subflow runs of {sorted(missing)} (ran: {sorted(n for n in subflow_names if n)})")
    if missing := expect.tasks - task_names:
        problems.append(f"no task runs of {sorted(missing)} (ran: {sorted(task_names)})")
    keys = {a.key for a in artifacts}
    if missing := {p for p in expect.artifacts if not fnmatch.filter(keys, p)}:
        problems.append(f"artifacts missing: {sorted(missing)} (published: {sorted(keys)})")
    plots = [a for a in artifacts if a.type == "markdown" and PNG_DATA_URL in str(a.data)]
    if len(plots) < expect.min_plots:
        problems.append(f"{len(plots)} plot artifacts, expected at least {expect.min_plots}")
    if problems:
        raise E2EError("API checks failed:\n  " + "\n  ".join(problems))
    return {
        "flow_runs": len(runs),
        "subflows": sorted(n for n in subflow_names if n),
        "task_runs": len(tasks),
        "artifacts": sorted(keys),
        "plots": plots,
        "run_artifacts": [a for a in artifacts if a.flow_run_id == run.id],
    }
