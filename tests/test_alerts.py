"""Run alerts: failed and crashed runs (flow state hooks), promotions and worse challengers reach a loopback JSON
webhook through Apprise's json:// URL, naming the run, the stage and the reason; a delivery failure changes nothing."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
from uuid import UUID, uuid4

import pytest
from conftest import REPO_ROOT, command_env
from prefect import flow, task
from prefect.client.orchestration import get_client

from gptflow.settings import SettingsError, get_settings, load_settings
from scripts.alert_receiver import AlertReceiver
from tasks.alerts import ALERT_HOOKS, RunRef, notify


@pytest.fixture
def receiver(settings, monkeypatch):
    """A receiver that GPTFLOW_ALERT_URL points at."""
    with AlertReceiver() as server:
        monkeypatch.setenv("GPTFLOW_ALERT_URL", server.url)
        get_settings.cache_clear()
        yield server
        get_settings.cache_clear()


@task
def check_columns() -> None:
    raise ValueError("bad column 'x'")


@flow(name="alert-check-data", **ALERT_HOOKS)
def check_data() -> None:
    check_columns()


@flow(name="alert-run", **ALERT_HOOKS)
def failing_run() -> None:
    check_data()


def flow_run_name(state) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def message_lines(request: dict) -> list[str]:
    return request["json"]["message"].splitlines()


def test_failed_run_sends_one_alert_naming_run_stage_and_reason(prefect_harness, receiver):
    state = failing_run(return_state=True)

    assert state.is_failed() and state.message == "Flow run encountered an exception: ValueError: bad column 'x'"
    # the subflow has the hooks too: its failure is reported once, by the top-level run
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request["method"] == "POST" and request["path"] == "/hook"
    assert request["headers"]["Content-Type"] == "application/json"
    payload = request["json"]
    assert set(payload) == {"version", "title", "message", "type", "attachments"}
    name, run_id = flow_run_name(state), state.state_details.flow_run_id
    assert payload["version"] == "1.0" and payload["type"] == "failure" and payload["attachments"] == []
    assert payload["title"] == f"gptflow: failed: {name}"
    lines = message_lines(request)
    assert lines[:3] == [
        f"run: {name} (flow alert-run, id {run_id})",
        "stage: alert-check-data / check_columns",
        "reason: Task run encountered an exception ValueError: bad column 'x'",
    ]
    assert lines[3].startswith("stage run: ") and lines[3].split(" / ")[1].startswith("check_columns-")
    assert lines[4].startswith("ui: http") and lines[4].endswith(f"/runs/flow-run/{run_id}")


def test_failure_in_the_flow_itself_names_the_flow_as_the_stage(prefect_harness, receiver):
    @flow(name="alert-own-code", **ALERT_HOOKS)
    def own_code() -> None:
        raise RuntimeError("no rows left after cleaning")

    state = own_code(return_state=True)

    assert state.is_failed()
    [request] = receiver.requests
    assert message_lines(request)[1:3] == [
        "stage: alert-own-code",
        "reason: Flow run encountered an exception: RuntimeError: no rows left after cleaning",
    ]


CRASHING_RUN = """
    import pathlib, sys, time
    from prefect import flow, task
    from tasks.alerts import ALERT_HOOKS

    @task
    def train_step(marker):
        pathlib.Path(marker).touch()
        time.sleep(300)

    @flow(name="alert-crash-train")
    def train(marker):
        train_step(marker)

    @flow(name="alert-crash-run", **ALERT_HOOKS)
    def run(marker):
        train(marker)

    run(sys.argv[1])
"""


def test_run_terminated_by_sigterm_sends_a_crash_alert(prefect_harness, receiver, tmp_path, mirror):
    """A real crash: the run's process gets SIGTERM (what a worker, Docker or Kubernetes sends) mid-task."""
    from prefect.settings import PREFECT_API_URL

    env = command_env(tmp_path, mirror)
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), GPTFLOW_ALERT_URL=receiver.url)
    marker = tmp_path / "training"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CRASHING_RUN), str(marker)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    log = child.communicate(timeout=120)[0].decode()

    assert child.returncode != 0
    assert len(receiver.requests) == 1, log[-3000:]
    payload = receiver.requests[0]["json"]
    lines = payload["message"].splitlines()
    run_id = UUID(lines[0].rsplit("id ", 1)[1].rstrip(")"))
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_crashed()
    assert payload["type"] == "failure" and payload["title"] == f"gptflow: crashed: {run.name}"
    assert lines[:3] == [
        f"run: {run.name} (flow alert-crash-run, id {run_id})",
        "stage: alert-crash-train / train_step",
        "reason: Execution was aborted by a termination signal.",
    ]


def test_promotion_from_a_registry_task_names_the_current_run(prefect_harness, receiver):
    @task
    def promote() -> bool:
        return notify(
            "promoted",
            run=RunRef.current(),
            stage="registry",
            reason="challenger beats the champion",
            details={"accuracy": 0.975, "champion accuracy": 0.96},
        )

    @flow(name="alert-registry")
    def registry() -> bool:
        return promote()

    state = registry(return_state=True)

    assert state.result() is True
    [request] = receiver.requests
    name, run_id = flow_run_name(state), state.state_details.flow_run_id
    assert request["json"]["type"] == "success"
    assert request["json"]["title"] == f"gptflow: promoted: {name}"
    assert message_lines(request)[:5] == [
        f"run: {name} (flow alert-registry, id {run_id})",
        "stage: registry",
        "reason: challenger beats the champion",
        "accuracy: 0.975",
        "champion accuracy: 0.96",
    ]


def test_worse_challenger_alert_is_a_warning_with_a_ui_link(receiver):
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    run = RunRef("nightly-otter", uuid4(), "pipeline")
    with temporary_settings({PREFECT_UI_URL: "http://prefect.example/ui"}):
        sent = notify(
            "challenger-worse", run=run, stage="registry", reason="accuracy 0.91 < champion 0.96 - 0.02", details={}
        )

    assert sent is True
    [request] = receiver.requests
    assert request["json"]["type"] == "warning"
    assert request["json"]["title"] == "gptflow: challenger-worse: nightly-otter"
    assert message_lines(request) == [
        f"run: nightly-otter (flow pipeline, id {run.id})",
        "stage: registry",
        "reason: accuracy 0.91 < champion 0.96 - 0.02",
        f"ui: http://prefect.example/ui/runs/flow-run/{run.id}",
    ]


def test_without_an_alert_url_nothing_is_sent_and_nothing_fails(prefect_harness, settings):
    with AlertReceiver() as server:
        assert get_settings().alert_url is None
        state = failing_run(return_state=True)
        sent = notify("promoted", run=RunRef("quiet-run"), stage="registry", reason="better")

    assert state.is_failed() and state.message == "Flow run encountered an exception: ValueError: bad column 'x'"
    assert sent is False and server.requests == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fault", ["status 500", "closed port"])
def test_undeliverable_alert_leaves_the_run_state_and_logs_a_warning(
    prefect_harness, receiver, monkeypatch, caplog, fault
):
    if fault == "status 500":
        receiver.status = 500
        url = receiver.url
    else:
        url = f"json://127.0.0.1:{closed_port()}/hook"
        monkeypatch.setenv("GPTFLOW_ALERT_URL", url)
        get_settings.cache_clear()

    with caplog.at_level(logging.WARNING):
        state = failing_run(return_state=True)
        sent = notify("promoted", run=RunRef("some-run"), stage="registry", reason="better")

    assert state.is_failed() and state.message == "Flow run encountered an exception: ValueError: bad column 'x'"
    assert sent is False
    assert len(receiver.requests) == (2 if fault == "status 500" else 0)
    warnings = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    name = flow_run_name(state)
    assert warnings == [
        f"alert 'failed' about run {name} not delivered to {url}",
        f"alert 'promoted' about run some-run not delivered to {url}",
    ]


def test_alert_url_apprise_cannot_parse_is_a_settings_error(settings, monkeypatch):
    for url in ["https://hooks.example/xyz", "slack://only-one-token"]:
        monkeypatch.setenv("GPTFLOW_ALERT_URL", url)
        with pytest.raises(SettingsError) as error:
            load_settings()
        message = str(error.value)
        assert "GPTFLOW_ALERT_URL" in message and "json://HOST:PORT/PATH" in message and "mailto://" in message
        assert "only-one-token" not in message and "hooks.example" not in message  # URLs hold secrets
    for url in ["json://127.0.0.1:8080/hook", "slack://TA/TB/TC", "mailto://user:secret@example.com"]:
        monkeypatch.setenv("GPTFLOW_ALERT_URL", url)
        assert load_settings().alert_url == url
    monkeypatch.setenv("GPTFLOW_ALERT_URL", " ")
    assert load_settings().alert_url is None


def test_entrypoint_flows_of_the_deployments_carry_the_alert_hooks():
    from flows.evaluate import compare_responses_flow, evaluate_responses_flow
    from flows.pretrain import pretrain_flow
    from tasks.alerts import alert_on_crash, alert_on_failure

    for entrypoint in (pretrain_flow, evaluate_responses_flow, compare_responses_flow):
        assert entrypoint.on_failure_hooks == [alert_on_failure]
        assert entrypoint.on_crashed_hooks == [alert_on_crash]
