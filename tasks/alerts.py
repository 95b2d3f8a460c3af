"""Run alerts through Prefect's Apprise notification block, to the Apprise URL of GPTFLOW_ALERT_URL (json://, slack://,
mailto://, ...): a failed or crashed run (flow state hooks: `@flow(..., **ALERT_HOOKS)`), a promotion and a
challenger worse than the champion (`notify` from the registry).

An alert never changes a run's outcome: a delivery failure is a warning in the run's logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Mapping
from uuid import UUID

from prefect import Flow, get_run_logger
from prefect.blocks.notifications import AppriseNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger
from prefect.logging.loggers import flow_run_logger
from prefect.states import State
from prefect.utilities.urls import url_for

from gptflow.settings import get_settings

Event = Literal["failed", "crashed", "promoted", "challenger-worse"]

# Apprise's notification types: services that show them (colour, icon) tell a failure from a promotion at a glance.
_NOTIFY_TYPES: dict[str, Literal["info", "success", "warning", "failure"]] = {
    "failed": "failure",
    "crashed": "failure",
    "promoted": "success",
    "challenger-worse": "warning",
}
_BAD_STATES = [StateType.FAILED, StateType.CRASHED]


@dataclass(frozen=True)
class RunRef:
    """The flow run an alert is about."""

    name: str
    id: UUID | None = None
    flow: str | None = None

    @classmethod
    def current(cls) -> RunRef:
        """The flow run of the calling flow or task."""
        from prefect.runtime import flow_run

        return cls(flow_run.name, UUID(flow_run.id), flow_run.flow_name)

    def __str__(self) -> str:
        about = ", ".join(part for part in (self.flow and f"flow {self.flow}", self.id and f"id {self.id}") if part)
        return f"{self.name} ({about})" if about else self.name


def notify(event: Event, *, run: RunRef, stage: str, reason: str, details: Mapping[str, Any] | None = None) -> bool:
    """Send one alert to GPTFLOW_ALERT_URL: True when delivered, False when no URL is set or delivery failed."""
    url = get_settings().alert_url
    if url is None:
        return False
    lines = [f"run: {run}", f"stage: {stage}", f"reason: {reason}"]
    lines += [f"{key}: {value}" for key, value in (details or {}).items()]
    if run.id is not None and (link := url_for("flow-run", obj_id=run.id)):
        lines.append(f"ui: {link}")
    block = AppriseNotificationBlock(url=url, notify_type=_NOTIFY_TYPES[event])
    try:
        with block.raise_on_failure():
            block.notify("\n".join(lines), f"gptflow: {event}: {run.name}", _sync=True)
    except Exception as exc:  # an alert must never fail the run it reports on
        because = f": {exc}" if str(exc).strip() else ""
        _logger(run).warning("alert %r about run %s not delivered to %s%s", event, run.name, _where(url), because)
        return False
    return True


def alert_on_failure(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """on_failure hook of an entrypoint flow."""
    _alert_from_hook("failed", flow, flow_run, state)


def alert_on_crash(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """on_crashed hook of an entrypoint flow: the process was interrupted or terminated (SIGTERM, Ctrl-C)."""
    _alert_from_hook("crashed", flow, flow_run, state)


ALERT_HOOKS = {"on_failure": [alert_on_failure], "on_crashed": [alert_on_crash]}


def _alert_from_hook(event: Event, flow: Flow, flow_run: FlowRun, state: State) -> None:
    # A subflow's failure is reported once, by its top-level run, which names the subflow as the stage.
    if flow_run.parent_task_run_id is not None or get_settings().alert_url is None:
        return
    run = RunRef(flow_run.name, flow_run.id, flow.name)
    stage, reason, details = flow.name, state.message or state.name, {}
    try:
        found = failed_stage(flow_run.id)
    except Exception as exc:  # the alert still goes out, naming the flow instead of the stage
        _logger(run).warning("alert %r: could not read the failed stage of run %s: %s", event, run.name, exc)
    else:
        if found is not None:
            stage, reason, stage_runs = found
            details = {"stage run": stage_runs}
    notify(event, run=run, stage=stage, reason=reason, details=details)


def failed_stage(flow_run_id: UUID) -> tuple[str, str, str] | None:
    """The deepest failed or crashed subflow or task under a flow run, as (its path of flow and task names, its state
    message, its path of run names); None when no child run failed (the flow's own code did). Among failed siblings
    the last one to end wins: the failure that ended the run."""
    names: list[str] = []
    runs: list[str] = []
    reason = ""
    with get_client(sync_client=True) as client:
        while True:
            subflows = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])),
                sort=FlowRunSort.END_TIME_DESC,
            )
            failed = next((r for r in subflows if r.state_type in _BAD_STATES), None)
            if failed is not None:
                names.append(client.read_flow(failed.flow_id).name)
                runs.append(failed.name)
                reason = _message(failed)
                flow_run_id = failed.id
                continue
            trackers = {r.parent_task_run_id for r in subflows}  # a subflow's task run in its parent's runs
            tasks = client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]),
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_BAD_STATES)),
                ),
                sort=TaskRunSort.END_TIME_DESC,
            )
            task = next((t for t in tasks if t.id not in trackers), None)
            if task is not None:
                names.append(_task_name(task))
                runs.append(task.name)
                reason = _message(task)
            break
    return (" / ".join(names), reason, " / ".join(runs)) if names else None


def _message(run: FlowRun | TaskRun) -> str:
    return (run.state.message if run.state else None) or (run.state_name or "failed")


def _task_name(task: TaskRun) -> str:
    """The task's name: its run's name without the `-<dynamic key>` suffix Prefect adds (a custom run name stays)."""
    head, _, tail = task.name.rpartition("-")
    return head if head and tail and task.dynamic_key.startswith(tail) else task.name


def _logger(run: RunRef) -> logging.Logger | logging.LoggerAdapter:
    """The run's logger: a crash hook runs after the run's context is gone, so it logs to the run by its id."""
    try:
        return get_run_logger()
    except MissingContextError:
        if run.id is None:
            return get_logger("gptflow.alerts")
        return flow_run_logger(flow_run_id=run.id, flow_run_name=run.name, flow_name=run.flow or "<unknown>")


def _where(url: str) -> str:
    """The alert URL as Apprise prints it with secrets masked, without its options."""
    import apprise

    return apprise.Apprise.instantiate(url).url(privacy=True).split("?", 1)[0]
