"""Devices, precision and torchrun variables: what this machine has, what a config may ask for, and a checkpoint
written on a GPU that resumes on the CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_config, write_random_tokens
from pydantic import ValidationError

from gptflow.ranks import DistributedEnvError, Ranks, process_ranks
from model.device import (
    BF16_MARGIN,
    DeviceError,
    available_devices,
    cpu_bf16_speedup,
    resolve_device,
    resolve_precision,
)
from model.files import CHECKPOINT_LMS
from model.opener import open_model
from model.pretrain import PretrainConfig, pretrain

TORCHRUN_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


# --- torchrun variables -------------------------------------------------------------------------------------


def test_process_ranks_outside_torchrun_is_rank_0_of_1():
    ranks = process_ranks({})
    assert ranks == Ranks(0, 0, 1)
    assert ranks.is_main and not ranks.distributed
    assert process_ranks({"MASTER_ADDR": "127.0.0.1", "PATH": "/usr/bin"}) == Ranks(0, 0, 1)  # no rank variable


def test_process_ranks_reads_the_torchrun_variables():
    ranks = process_ranks(TORCHRUN_ENV)
    assert ranks == Ranks(rank=1, local_rank=1, world_size=2)
    assert ranks.distributed and not ranks.is_main
    assert process_ranks({**TORCHRUN_ENV, "RANK": "0", "LOCAL_RANK": "0"}).is_main


def test_process_ranks_refuses_half_set_or_inconsistent_variables():
    with pytest.raises(DistributedEnvError, match=r"WORLD_SIZE is set but RANK is not") as half:
        process_ranks({"WORLD_SIZE": "2"})
    assert isinstance(half.value, ValueError)
    without_port = {k: v for k, v in TORCHRUN_ENV.items() if k != "MASTER_PORT"}
    with pytest.raises(DistributedEnvError, match=r"RANK is set but MASTER_PORT is not"):
        process_ranks(without_port)
    with pytest.raises(DistributedEnvError, match=r"RANK='one' is not an integer"):
        process_ranks({**TORCHRUN_ENV, "RANK": "one"})
    with pytest.raises(DistributedEnvError, match=r"RANK=2 is outside 0\.\.1 \(WORLD_SIZE=2\)"):
        process_ranks({**TORCHRUN_ENV, "RANK": "2"})
    with pytest.raises(DistributedEnvError, match=r"WORLD_SIZE=0 must be at least 1"):
        process_ranks({**TORCHRUN_ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "0"})


# --- devices ------------------------------------------------------------------------------------------------


def test_resolve_device_on_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert available_devices()[0] == "cpu"
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        assert available_devices() == ["cpu"]


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:3", "mps"])
def test_a_device_this_machine_lacks_is_refused_by_name(spec):
    if spec == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DeviceError, match=rf"device {spec}(:0)? is not available on this machine; available: cpu"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "mps:1", ""])
def test_config_rejects_what_is_not_a_device(spec):
    with pytest.raises(ValidationError, match="is not a device; expected auto, cpu, cuda, cuda:N or mps"):
        PretrainConfig(device=spec)
    assert PretrainConfig(device="cuda:1").device == "cuda:1"  # a well-formed name is checked at run time
    with pytest.raises(DeviceError, match="is not a device"):
        resolve_device(spec)


# --- precision ----------------------------------------------------------------------------------------------


def test_precision_on_the_cpu():
    cpu = torch.device("cpu")
    with pytest.raises(DeviceError, match="precision fp16 is not supported on the CPU"):
        resolve_precision("fp16", cpu)
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    speedup = cpu_bf16_speedup()
    assert isinstance(speedup, float) and speedup > 0
    assert cpu_bf16_speedup() == speedup  # measured once per process
    assert resolve_precision("auto", cpu) == ("bf16" if speedup > 1 / BF16_MARGIN else "fp32")


# --- a GPU checkpoint resumed on the CPU ------------------------------------------------------------------------


class Killed(Exception):
    pass


@pytest.fixture
def corpus(tmp_path):
    return write_random_tokens(tmp_path / "corpus", 4000, 1000, seed=7)


@pytest.fixture
def keep_threads():
    """The runs below train on 1 thread (set process-wide); later tests get torch's count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def saved_as_on_cuda():
    """Inside the block, `torch.save` tags every CPU storage with location "cuda:0", as a file written from a GPU
    is tagged; loading is left to torch's own deserializers (ours returns None)."""
    entry = (0, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda storage, location: None)
    torch.serialization.register_package(*entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


@pytest.mark.slow
def test_checkpoint_written_on_a_gpu_resumes_on_the_cpu(corpus, tmp_path, keep_threads):
    config = tiny_config(
        "pretrain",
        context_length=16,
        batch_size=2,
        steps=6,
        warmup_steps=2,
        lr=3e-3,
        log_every=1,
        eval_every=3,
        eval_batches=2,
        checkpoint_every=2,
        sample_tokens=0,
        device="cpu",
        precision="fp32",
        threads=1,
    )
    full = pretrain(corpus, tmp_path / "full", config, progress=False)

    def kill_at_step_5(record):
        if record["kind"] == "train" and record["step"] == 5:
            raise Killed

    checkpoint = tmp_path / "split" / "last.pt"
    with saved_as_on_cuda(), pytest.raises(Killed):
        pretrain(corpus, tmp_path / "split", config, on_log=kill_at_step_5, progress=False)
    assert all(e[0] != 0 for e in torch.serialization._package_registry)
    assert not (tmp_path / "split" / "model.pt").exists()

    if not torch.cuda.is_available():  # as on any CPU-only machine, the file cannot be loaded as it is
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(checkpoint, weights_only=True)
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["train_state"]["step"] == 4

    seen = []
    resumed = pretrain(corpus, tmp_path / "split", config, on_log=seen.append, progress=False)
    assert [r["step"] for r in seen if r["kind"] == "resume"] == [4]
    assert [r["step"] for r in seen if r["kind"] == "train"] == [5, 6]
    assert not resumed.reused and resumed.metrics["steps"] == 6 == full.metrics["steps"]
    assert resumed.metrics["device"] == "cpu" and resumed.metrics["precision"] == "fp32"

    # The resumed run's own checkpoint holds CPU tensors only: the optimizer state was restored to the CPU.
    final = torch.load(checkpoint, weights_only=True)
    assert final["train_state"]["step"] == 6
    moments = [t for s in final["optimizer"]["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert moments and all(t.device.type == "cpu" for t in moments)

    a, b = (
        open_model(full.model_path, CHECKPOINT_LMS).language_model().state_dict(),
        open_model(resumed.model_path, CHECKPOINT_LMS).language_model().state_dict(),
    )
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert resumed.metrics["val_loss"] == pytest.approx(full.metrics["val_loss"], abs=1e-6)
