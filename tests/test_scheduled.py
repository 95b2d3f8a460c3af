"""What scheduled runs rely on: a time limit from the run's parameters, and the registry verbs people use."""

from __future__ import annotations

import json
import os
import time

import pytest
from test_registry import make_bundle

import cli
from gptflow.registry import Registry


def test_a_run_past_its_time_limit_ends_timed_out(prefect_harness):
    from prefect import flow

    from flows.limits import time_limit

    @flow
    def slow(timeout_minutes: float) -> str:
        with time_limit(timeout_minutes, "the slow run"):
            time.sleep(30)
        return "finished"

    @flow
    def quick(timeout_minutes: float | None) -> str:
        with time_limit(timeout_minutes, "the quick run"):
            return "finished"

    started = time.monotonic()
    state = slow(0.02, return_state=True)
    assert time.monotonic() - started < 20
    assert state.is_failed() and state.name == "TimedOut"
    assert "the slow run exceeded its time limit of 0.02 minutes (parameter timeout_minutes)" in state.message
    assert quick(None) == "finished" and quick(5.0) == "finished"


def test_registry_verbs_list_show_promote_rollback(tmp_path, settings, capsys):
    assert cli.main(["registry", "list"]) == 0
    assert "the registry is empty" in capsys.readouterr().out
    registry = Registry("classifier-spam")
    registry.promote(make_bundle(tmp_path / "a", "A"), {"scores": {"k": {"accuracy": 0.9}}}, reason="first", run="r1")
    registry.promote(make_bundle(tmp_path / "b", "B"), {"scores": {"k": {"accuracy": 0.95}}}, reason="better", run="r2")

    assert cli.main(["registry", "list"]) == 0
    out = capsys.readouterr().out
    assert "classifier-spam" in out and "v0002" in out and str(registry.link) in out
    assert cli.main(["registry", "list", "classifier-spam"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[-1]) for r in rows] == [("v0001", "0.9"), ("v0002", "0.95")] and rows[1][1] == "*"

    assert cli.main(["registry", "show", "classifier-spam"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v0002" and shown["run"] == "r2" and shown["path"].endswith("versions/v0002")

    assert cli.main(["registry", "rollback", "classifier-spam", "--reason", "bad release"]) == 0
    assert "rolled back to v0001 (bad release)" in capsys.readouterr().out
    assert os.readlink(registry.link) == "versions/v0001"
    assert cli.main(["registry", "promote", "classifier-spam", "v0002"]) == 0
    assert os.readlink(registry.link) == "versions/v0002"
    assert cli.main(["registry", "promote", "classifier-spam", str(make_bundle(tmp_path / "c", "C"))]) == 0
    assert os.readlink(registry.link) == "versions/v0003"
    events = registry.state()["events"]
    assert [e["action"] for e in events] == ["promote", "promote", "rollback", "promote", "promote"]
    assert events[-1]["run"].startswith("cli (") and events[2]["reason"] == "bad release"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["registry", "show", "classifier-nope"], "no registry task 'classifier-nope' (tasks: none yet)"),
        (["registry", "show", "Bad Name"], "registry task 'Bad Name': expected lower-case"),
    ],
)
def test_registry_verbs_bad_input_is_one_line(argv, message, settings, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_registry_rollback_without_history_and_unknown_version(tmp_path, settings, capsys):
    Registry("lm-instructions").promote(make_bundle(tmp_path / "a", "A", kind="lm"), {}, reason="first", run="r1")
    assert cli.main(["registry", "rollback", "lm-instructions"]) == 2
    assert "no earlier champion to roll back to" in capsys.readouterr().err
    assert cli.main(["registry", "promote", "lm-instructions", "v0007"]) == 2
    assert "no version 'v0007' (versions: v0001)" in capsys.readouterr().err
