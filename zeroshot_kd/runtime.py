"""Devices, precision, per-work-item seeds and the torchrun/process-group environment."""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import ContextManager

import torch

from .errors import ZkdError

__all__ = ["DistEnv", "autocast", "batch_generator", "batch_seed", "dist_env", "resolve_device"]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda (the local rank's GPU under torchrun), else mps, else cpu; validates explicit choices."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ZkdError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZkdError(f"--device {device} asked for but CUDA is not available; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ZkdError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Autocast context for forward passes (a no-op for fp32). Losses are computed in float32 by callers."""
    if precision not in _DTYPES:
        raise ZkdError(f"unknown --precision {precision!r}; use fp32, bf16 or fp16")
    dtype = _DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device):
    """Ask cuDNN for deterministic algorithms (and no autotuning) for the duration, then restore its flags.

    Some of cuDNN's convolution backward algorithms accumulate with atomics, so two identical runs could write
    different bytes; the synthesis contract is the same bytes for the same command. A no-op off CUDA.
    """
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def batch_seed(seed: int, index: int, salt: str = "") -> int:
    """A 63-bit seed that depends only on (seed, work-item index, salt), never on the process or rank."""
    digest = hashlib.sha256(f"zkd:{salt}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_generator(seed: int, index: int, salt: str = "") -> torch.Generator:
    """A CPU generator seeded from :func:`batch_seed`; draw on CPU then move, so every device sees the same numbers."""
    return torch.Generator().manual_seed(batch_seed(seed, index, salt))


def device_generator(seed: int, index: int, salt: str, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded like :func:`batch_generator`, for random masks drawn where the tensors live
    (QDrop) instead of on the CPU and copied each step. Its stream differs between device types."""
    return torch.Generator(device=torch.device(device)).manual_seed(batch_seed(seed, index, salt))


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Rank and world size from torchrun's environment (RANK/WORLD_SIZE/LOCAL_RANK); single process otherwise."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(device: torch.device) -> bool:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) if launched with WORLD_SIZE > 1."""
    import torch.distributed as dist

    env = dist_env()
    if env.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
