"""The process group from torchrun's environment: rank, world size, initialisation with a timeout."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "DEFAULT_TIMEOUT_S", "launched", "init_from_env", "rank", "world_size", "is_main",
           "barrier", "shutdown"]

#: Seconds a collective waits for the other ranks before it fails (a dead rank must not hang the rest).
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, the
    ``backend`` of the process group and the ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that prints, writes files and assembles results)."""
        return self.rank == 0


def launched() -> bool:
    """True when torchrun (or another launcher setting ``WORLD_SIZE`` and ``RANK``) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: Union[str, torch.device, None] = None, backend: Optional[str] = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); initialises it once.

    ``backend``: default ``nccl`` on CUDA, ``gloo`` on the CPU. ``device``: ``"cuda"`` picks the GPU
    ``cuda:LOCAL_RANK``; default CUDA when available. A collective that waits longer than
    ``timeout_s`` for another rank raises instead of hanging. Without a launcher's environment the
    result describes a single process (rank 0 of 1) and no group is created.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not launched():
        return DistEnv(0, 1, 0, backend, device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 or without a process group."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
