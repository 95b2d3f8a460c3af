"""Where tensors live and in which precision the matmuls run, decided at run time from what the machine has.

`device`: auto | cpu | cuda | cuda:N | mps. `auto` picks CUDA, then MPS, then the CPU; under torchrun a bare
`cuda` (or `auto` on a CUDA machine) means the GPU of the process's LOCAL_RANK.

`precision`: auto | fp32 | bf16 | fp16 (autocast; the weights and optimizer state stay fp32). `auto` is bf16 on a
CUDA GPU that supports it, else fp16 with a gradient scaler; fp32 on MPS; and on a CPU whatever a short
measurement says is faster. A CPU that "supports" bf16 can still run it far slower than fp32 (some run bf16
matmuls in a slow fallback), and one that has native bf16 instructions runs it several times faster, so
`auto` times the forward and backward pass of a small transformer MLP in both precisions, once per process.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch

from gptflow.errors import GptflowError
from gptflow.ranks import process_ranks
from model.config import GPTConfig
from model.configs import check_device_spec

Resolved = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_MARGIN = 0.9  # auto picks bf16 on a CPU only when its step takes under 90% of the fp32 one


class DeviceError(GptflowError, ValueError):
    """A device or precision this machine does not have."""


def available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device for `spec`; a device this machine lacks ends in one line naming what it has."""
    try:
        check_device_spec(spec)
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    local_rank = process_ranks().local_rank
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    kind, _, index = spec.partition(":")
    missing = (kind == "cuda" and not torch.cuda.is_available()) or (
        kind == "mps" and not torch.backends.mps.is_available()
    )
    if kind == "cuda" and not missing:
        n = int(index) if index else local_rank
        missing = n >= torch.cuda.device_count()
        spec = f"cuda:{n}"
    if missing:
        raise DeviceError(
            f"device {spec} is not available on this machine; available: {', '.join(available_devices())}"
        )
    device = torch.device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the default CUDA stream follow the current device
    return device


def allow_tf32(device: torch.device) -> None:
    """TF32 tensor cores for the fp32 matmuls of training on a GPU that has them (Ampere and newer). Inference
    (generation, classification, export parity) keeps full fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_precision(requested: str, device: torch.device) -> Resolved:
    """`auto` decided for `device` (see the module docstring); an explicit choice is checked against it."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_bf16_speedup() > 1 / BF16_MARGIN else "fp32"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise DeviceError("precision fp16 is not supported on the CPU; use bf16, fp32 or auto")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name(device)} has no bf16 support; use fp16, fp32 or auto")
    return requested  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of the forward and backward pass of a transformer MLP (LayerNorm, 256 ->
    1024 -> 256, GELU) over 512 rows, best of a few runs, on this process's threads. A bf16 path that is already
    3x slower than fp32 after one run is not timed further."""
    torch_state = torch.get_rng_state()
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.LayerNorm(256), torch.nn.Linear(256, 1024), torch.nn.GELU("tanh"), torch.nn.Linear(1024, 256)
    )
    x = torch.randn(512, 256)
    torch.set_rng_state(torch_state)

    def best_time(bf16: bool, limit: float) -> float:
        times = []
        for _ in range(4):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = block(x)
            y.float().sum().backward()
            times.append(time.perf_counter() - start)
            if times[-1] > limit:
                break
        return min(times[1:] or times)  # the first run pays for allocation and kernel selection

    fp32 = best_time(False, float("inf"))
    return fp32 / best_time(True, 3 * fp32)


def autocast(precision: str, device: str | torch.device = "cpu"):
    """Autocast to `precision` (a resolved one) on `device`; fp32 is a no-op context."""
    return torch.autocast(
        device_type=torch.device(device).type, dtype=DTYPES.get(precision, torch.float32), enabled=precision != "fp32"
    )


@dataclass(frozen=True)
class Runtime:
    """A resolved device and precision; `str()` is what manifests record, e.g. "cuda:0 bf16"."""

    device: torch.device
    precision: Resolved

    def autocast(self):
        return autocast(self.precision, self.device)

    def __str__(self) -> str:
        return f"{self.device} {self.precision}"


@functools.lru_cache(maxsize=None)
def runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Device and precision for a config's `device` and `precision` fields (cached per process)."""
    resolved = resolve_device(device)
    return Runtime(resolved, resolve_precision(precision, resolved))


class TooBigError(GptflowError, ValueError):
    """A training step would not fit in the device's memory; said before the first step, not after minutes."""


def memory_bytes(device: torch.device) -> int | None:
    """The memory a run on `device` can have at most: the GPU's, or the machine's RAM (None where unknown: MPS)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    return None


def training_step_bytes(cfg: GPTConfig, batch_size: int, tokens: int, precision: str) -> int:
    """A lower bound on the memory of one training step: fp32 weights, gradients and two AdamW moments (16 bytes a
    parameter), plus the activations kept for the backward pass, about 17 values of width `emb_dim` per token and
    layer (Korthikanti et al. 2022, without the attention matrix, which SDPA does not keep)."""
    activation_bytes = 4 if precision == "fp32" else 2
    activations = 17 * batch_size * tokens * cfg.emb_dim * cfg.n_layers * activation_bytes
    return 16 * cfg.n_params() + activations


def check_fits(
    cfg: GPTConfig, batch_size: int, tokens: int, rt: Runtime, what: str, available: int | None = None
) -> None:
    """Refuse a model and batch whose training step needs more memory than the device has (`available`, default
    `memory_bytes`), naming the shape and the knobs that shrink it."""
    available = memory_bytes(rt.device) if available is None else available
    needed = training_step_bytes(cfg, batch_size, tokens, rt.precision)
    if available is not None and needed > available:
        raise TooBigError(
            f"{what}: a training step of {batch_size} x {tokens} tokens through {cfg.n_layers} layers of width "
            f"{cfg.emb_dim} needs at least {needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of "
            f"{rt.device}; lower --context-length or --batch-size (--grad-accum keeps the global batch)"
        )
