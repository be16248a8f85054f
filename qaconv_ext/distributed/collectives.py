"""Collectives on tensors whose first dimension differs across ranks, and on small Python objects."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist

from .env import world_size

__all__ = ["RankFailure", "collective", "gather_rows", "all_gather_rows", "all_gather_objects"]


class RankFailure(RuntimeError):
    """A collective failed: another rank died, or did not reach it within the process group's timeout."""


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a dead or stuck rank) into a :class:`RankFailure` that says so."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, RankFailure):
            raise
        raise RankFailure(f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} failed; another rank "
                          f"died or did not answer within the timeout ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e


def _comm_device(t: torch.Tensor) -> torch.device:
    # nccl moves CUDA tensors only; gloo moves CPU tensors
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_padded(local: torch.Tensor, dst: Optional[int]) -> Optional[List[torch.Tensor]]:
    with collective("gathering a tensor"):
        return _gather_padded_unchecked(local, dst)


def _gather_padded_unchecked(local: torch.Tensor, dst: Optional[int]) -> Optional[List[torch.Tensor]]:
    dev = _comm_device(local)
    world = world_size()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    rows = max(counts)
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[:local.shape[0]] = local.to(dev)
    if dst is None:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
        dist.gather(padded, parts, dst=dst)
        if parts is None:
            return None
    return [p[:c] for p, c in zip(parts, counts)]


def gather_rows(local: torch.Tensor, dst: int = 0) -> Optional[torch.Tensor]:
    """Concatenate every rank's ``local`` ``[n_r, ...]`` in rank order on rank ``dst`` (``None`` on the
    others); the ``n_r`` may differ (sizes are exchanged first, shards padded to the largest).
    In one process: ``local`` itself."""
    if world_size() == 1:
        return local
    parts = _gather_padded(local, dst)
    return None if parts is None else torch.cat(parts).to(local.device)


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_rows`, with the result on every rank."""
    if world_size() == 1:
        return local
    parts = _gather_padded(local, None)
    return torch.cat(parts).to(local.device)


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    with collective("gathering the options"):
        dist.all_gather_object(out, obj)
    return out
