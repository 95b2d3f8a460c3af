"""A training run killed with SIGKILL continues from its last checkpoint when started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import command_env

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pretrain_killed_mid_run_resumes_from_last_checkpoint(prefect_harness, tmp_path, mirror):
    from prefect.settings import PREFECT_API_URL

    env = command_env(tmp_path, mirror, api=PREFECT_API_URL.value())
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "pretrain",
        "--corpus",
        "the-verdict",
        "--preset",
        "tiny",
        "--steps",
        "40",
        "--checkpoint-every",
        "5",
        "--eval-every",
        "1000",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    checkpoint = out / "last.pt"
    deadline = time.monotonic() + 400
    while not checkpoint.is_file():
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    time.sleep(1.0)  # let it train past the first checkpoint
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists()  # the run really was cut short

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert resumed and str(checkpoint) in resumed[0], log[-3000:]
    step = int(resumed[0].rsplit("at step", 1)[1].split()[0])
    assert 5 <= step < 40 and step % 5 == 0
    assert (out / "model.pt").is_file() and (out / "manifest.json").is_file()
