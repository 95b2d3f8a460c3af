"""Devices, precision and torchrun variables: what this machine has and what a config may ask for. (A checkpoint
written on a GPU resuming on the CPU: test_model_pretrain.py's resume test.)"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from gptflow.ranks import DistributedEnvError, Ranks, process_ranks
from model.config import GPTConfig
from model.configs import PretrainConfig
from model.device import (
    BF16_MARGIN,
    DeviceError,
    Runtime,
    TooBigError,
    available_devices,
    check_fits,
    cpu_bf16_speedup,
    memory_bytes,
    resolve_device,
    resolve_precision,
    training_step_bytes,
)

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


def test_a_training_step_too_big_for_the_memory_is_refused_up_front():
    """Before: `--context-length 100000` trained for 7 minutes, then failed allocating 160 GB."""
    rt = Runtime(torch.device("cpu"), "fp32")
    big = GPTConfig.from_preset("mini", context_length=100_000)
    # 16 bytes a parameter + 17 fp32 values of width 256 per token and layer: 8 x 100,000 tokens x 4 layers
    assert training_step_bytes(big, 8, 100_000, "fp32") == 16 * big.n_params() + 17 * 8 * 100_000 * 256 * 4 * 4
    assert training_step_bytes(big, 8, 100_000, "bf16") == 16 * big.n_params() + 17 * 8 * 100_000 * 256 * 4 * 2
    with pytest.raises(TooBigError) as caught:
        check_fits(big, 8, 100_000, rt, "pretrain", available=24 * 2**30)
    assert str(caught.value) == (
        "pretrain: a training step of 8 x 100000 tokens through 4 layers of width 256 needs at least 52.5 GiB, "
        "more than the 24.0 GiB of cpu; lower --context-length or --batch-size (--grad-accum keeps the global batch)"
    )
    check_fits(GPTConfig.from_preset("mini"), 8, 256, rt, "pretrain", available=24 * 2**30)  # make run's shape
    assert memory_bytes(torch.device("cpu")) > 2**30  # this machine's RAM, what the check uses by default
