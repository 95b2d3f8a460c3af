"""Data-parallel pretraining under torchrun (2 gloo processes on the CPU): the same weights as one process
accumulating the same micro-batches, exact resume after the whole job is killed, and a checkpoint of 2 ranks
refused by a run of 1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_random_tokens

from gptflow.settings import get_settings
from gptflow.stage import StageError
from gptflow.storage import read_json, write_json_atomic
from model.checkpoint import load_checkpoint
from model.configs import PretrainConfig
from model.distributed import LaunchError
from model.files import CHECKPOINT_LMS
from model.launch import CALL, RECORDS, launch, torchrun_command
from model.opener import open_model
from model.pretrain import pretrain

TARGET = "model.pretrain:pretrain"
TWO_RANKS = {"kind": "torchrun", "nproc_per_node": 2}
CONFIG = tiny_config(
    "pretrain",
    context_length=32,
    batch_size=2,
    steps=6,
    warmup_steps=2,
    lr=3e-3,
    dropout=0.0,
    log_every=1,
    eval_every=3,
    eval_batches=2,
    checkpoint_every=3,
    sample_tokens=0,
    device="cpu",
    precision="fp32",
    threads=1,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory, mirror):
    """An outputs root and the mirror in the environment, which the torchrun processes inherit."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTFLOW_HOME", str(tmp_path_factory.mktemp("home")))
        patch.setenv("GPTFLOW_MIRROR", str(mirror))
        get_settings.cache_clear()
        threads = torch.get_num_threads()
        yield
        torch.set_num_threads(threads)  # the in-process runs set 1
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_random_tokens(tmp_path_factory.mktemp("corpus"), 20_000, 2_000, seed=11)


@pytest.fixture(scope="module")
def two_rank_run(env, corpus, tmp_path_factory):
    """CONFIG trained by 2 ranks through `launch()`: (stage folder, records handed to on_record, launch folder)."""
    root = tmp_path_factory.mktemp("two-ranks")
    records: list[dict] = []
    launch(
        TARGET,
        (corpus, root / "out"),
        {"resume": False},
        config=CONFIG.model_copy(update={"launcher": TWO_RANKS}),
        workdir=root / "launch",
        on_record=records.append,
    )
    return root / "out", records, root / "launch"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return open_model(path, CHECKPOINT_LMS).language_model().state_dict()


def assert_same_weights(path_a: Path, path_b: Path, rel: float = 1e-5) -> None:
    """Per tensor ||a - b|| / ||a|| <= rel."""
    a, b = weights(path_a), weights(path_b)
    assert a.keys() == b.keys()
    for name in a:
        error = (
            torch.linalg.vector_norm(a[name] - b[name]) / torch.linalg.vector_norm(a[name]).clamp(min=1e-12)
        ).item()
        assert error <= rel, f"{name}: relative difference {error:.3g}"


@pytest.mark.slow
def test_two_ranks_train_as_one_process_accumulating_their_micro_batches(env, corpus, tmp_path, two_rank_run):
    ranks_dir, records, workdir = two_rank_run
    local = pretrain(corpus, tmp_path / "local", CONFIG.model_copy(update={"grad_accum": 2}), progress=False)

    # The global batch is micro-batches 2s and 2s+1 at step s on both sides: rank r reads 2s+r, one process both.
    assert_same_weights(local.model_path, ranks_dir / "model.pt")
    manifest = read_json(ranks_dir / "manifest.json")
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["global_batch"] == 4
    assert manifest["config"]["world_size"] == 2 and manifest["config"]["grad_accum"] == 1
    assert local.metrics["world_size"] == 1 and local.metrics["global_batch"] == 4
    assert manifest["metrics"]["steps"] == 6 and manifest["metrics"]["tokens_seen"] == local.metrics["tokens_seen"]

    # Rank 0's records reached on_record: every step's loss averaged over the ranks, and both evaluations.
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    assert [r["tokens_seen"] for r in trains] == [4 * 32 * s for s in range(1, 7)]
    local_trains = [h for h in local.history if h["kind"] == "train"]
    local_evals = [h for h in local.history if h["kind"] == "eval"]
    assert [r["loss"] for r in trains] == pytest.approx([h["loss"] for h in local_trains], rel=1e-5)
    assert [r["val_loss"] for r in evals] == pytest.approx([h["val_loss"] for h in local_evals], rel=1e-5)
    assert evals[-1]["val_loss"] == pytest.approx(manifest["metrics"]["val_loss"])
    assert not workdir.exists()  # every rank succeeded: the launch folder is removed


def start_torchrun(config: PretrainConfig, data_dir: Path, out_dir: Path, workdir: Path) -> subprocess.Popen:
    """torchrun on `model.launch`, with the call written as `launch()` writes it, in a session of its own."""
    workdir.mkdir(parents=True)
    call = {
        "target": TARGET,
        "args": [str(data_dir), str(out_dir)],
        "kwargs": {"resume": False},
        "config_class": "model.configs:PretrainConfig",
        "config": config.model_dump(mode="json"),
        "records": str(workdir / RECORDS),
    }
    write_json_atomic(workdir / CALL, call)
    command = torchrun_command(config.launcher, workdir / CALL, workdir / "ranks", workdir.name)
    with open(workdir / "torchrun.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group alone, and wait until the ranks are dead too: torchrun starts each rank in
    a session of its own, and only their death signal (model.distributed.die_with_parent) takes them down."""
    ranks = children(process.pid)
    assert len(ranks) == 2, ranks
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in ranks):
        assert time.monotonic() < deadline, "the ranks outlived SIGKILL"
        time.sleep(0.05)


def rank_logs(workdir: Path) -> str:
    files = [workdir / "torchrun.log", *sorted((workdir / "ranks").rglob("std*.log"))]
    return "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-2000:]}" for f in files if f.is_file())


@pytest.mark.slow
def test_killed_two_rank_job_resumes_exactly(env, corpus, tmp_path):
    config = CONFIG.model_copy(
        update={"steps": 60, "checkpoint_every": 5, "eval_every": 30, "log_every": 5, "launcher": TWO_RANKS}
    )
    out = tmp_path / "killed"
    first = start_torchrun(config, corpus, out, tmp_path / "first")
    checkpoint = out / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file():
        assert first.poll() is None, rank_logs(tmp_path / "first")
        assert time.monotonic() < deadline, "no checkpoint appeared\n" + rank_logs(tmp_path / "first")
        time.sleep(0.05)
    time.sleep(1.0)  # let it train past the first checkpoint
    assert first.poll() is None, "the job finished before it was killed: give it more steps"
    kill_job(first)
    assert not (out / "model.pt").exists()  # the job really was cut short
    killed_at = load_checkpoint(checkpoint)["train_state"]["step"]
    assert 5 <= killed_at < 60 and killed_at % 5 == 0

    records: list[dict] = []
    launch(TARGET, (corpus, out), {"resume": True}, config=config, workdir=tmp_path / "again", on_record=records.append)
    assert records[0] == {"kind": "resume", "step": killed_at, "checkpoint": str(checkpoint)}, records[:2]
    trains = [r["step"] for r in records if r["kind"] == "train"]
    assert trains == list(range(killed_at + 5, 61, 5))
    assert read_json(out / "manifest.json")["metrics"]["steps"] == 60

    reference = tmp_path / "reference"
    launch(TARGET, (corpus, reference), {"resume": False}, config=config, workdir=tmp_path / "ref-launch")
    assert_same_weights(reference / "model.pt", out / "model.pt")
    assert read_json(reference / "manifest.json")["metrics"]["val_loss"] == pytest.approx(
        read_json(out / "manifest.json")["metrics"]["val_loss"], rel=1e-5
    )


@pytest.mark.slow
def test_a_two_rank_checkpoint_is_refused_by_one_process(env, corpus, tmp_path, two_rank_run):
    chosen = tmp_path / "chosen"
    shutil.copytree(two_rank_run[0], chosen)
    before = {p.name: p.read_bytes() for p in chosen.iterdir()}
    with pytest.raises(StageError, match=r"different config \(config world_size 2 -> 1\)") as refused:
        pretrain(corpus, chosen, CONFIG, progress=False)
    assert str(chosen) in str(refused.value)
    assert {p.name: p.read_bytes() for p in chosen.iterdir()} == before  # nothing touched

    # Unfinished: the manifest gone, only the 2-rank checkpoint left.
    (chosen / "manifest.json").unlink()
    (chosen / "model.pt").unlink()
    with pytest.raises(StageError, match=r"config world_size 2 -> 1"):
        pretrain(corpus, chosen, CONFIG, progress=False)
    assert load_checkpoint(chosen / "last.pt")["stage"]["config"]["world_size"] == 2


def test_a_torchrun_launcher_config_does_not_train_in_one_process(env, corpus, tmp_path):
    """The stage key names the launcher's 2 processes: training it in 1 would certify the wrong product."""
    config = CONFIG.model_copy(update={"launcher": TWO_RANKS})
    with pytest.raises(LaunchError, match="the config's launcher runs 2 training processes but this is a job of 1"):
        pretrain(corpus, tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
