"""Deterministic shards of an index range: contiguous blocks, in rank order."""
from __future__ import annotations

from typing import List

__all__ = ["shard_range", "shard_sizes"]


def shard_sizes(n: int, world: int, align: int = 1) -> List[int]:
    """The sizes of the ``world`` contiguous shards of ``range(n)`` (see :func:`shard_range`)."""
    if world < 1 or align < 1 or n < 0:
        raise ValueError(f"shard_sizes: need n >= 0, world >= 1, align >= 1 (got {n}, {world}, {align})")
    units = -(-n // align)  # blocks of `align` items, the last one possibly short
    base, extra = divmod(units, world)
    sizes = []
    start = 0
    for r in range(world):
        stop = min(n, start + (base + (r < extra)) * align)
        sizes.append(stop - start)
        start = stop
    return sizes


def shard_range(n: int, rank: int, world: int, align: int = 1) -> range:
    """The contiguous part of ``range(n)`` that ``rank`` of ``world`` handles.

    The shards cover ``range(n)`` once, in rank order, in whole blocks of ``align`` items (the last
    block may be short): every rank takes ``units // world`` blocks and the first ``units % world``
    ranks one more. With ``align`` equal to
    a batch size, every shard starts on a batch boundary, so a rank's batches are exactly batches of the
    one-process run.
    """
    if not 0 <= rank < world:
        raise ValueError(f"shard_range: rank {rank} is not in [0, {world})")
    sizes = shard_sizes(n, world, align)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])
