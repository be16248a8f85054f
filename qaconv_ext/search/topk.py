"""Exact top-k over galleries streamed in chunks, and the two-stage (shortlist, then re-rank) search.

Order everywhere: :func:`qaconv_ext.scoring.select_topk`'s (score descending, ties by the smaller
gallery index) -- the order a stable descending sort of the dense ``[P, N]`` score matrix gives, so
``streaming_topk`` returns exactly the first ``k`` columns of that sort (``torch.topk`` returns the same
values; its order among ties is unspecified). NaN scores rank first, as in ``torch.sort``/``torch.topk``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

from ..ops import qaconv_score
from ..ops.dtypes import score_weights
from ..scoring import blocks, select_topk

__all__ = [
    "select_topk",
    "merge_topk",
    "candidates",
    "streaming_topk",
    "global_descriptors",
    "descriptor_topk",
    "rerank_shortlist",
    "compute_dtype_for",
    "iterate_blocks",
]

Tensor = torch.Tensor
ChunkLike = Union[Tensor, np.ndarray]


def candidates(values: Tensor, indices: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The entries of each row ``[P, n]`` that can be among its top ``k``: every entry at or above the
    row's ``k``-th largest value (ties kept, NaN kept), packed into ``[P, w]`` in their column order
    (``w`` = the largest such count); short rows are padded with ``-inf`` at index ``int64`` max, which
    :func:`select_topk` ranks after every real entry. A fast ``torch.topk`` finds the threshold; the
    exact order is left to :func:`select_topk` on the few survivors."""
    P, n = values.shape
    if n <= k:
        return values, indices
    kth = torch.topk(values, k, dim=1).values[:, -1:]
    keep = (values >= kth) | torch.isnan(values) | torch.isnan(kth)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's survivors in column order
    counts = torch.bincount(rows, minlength=P)
    width = int(counts.max())
    slot = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]
    out_v = torch.full((P, width), -float("inf"), dtype=values.dtype)
    out_i = torch.full((P, width), torch.iinfo(torch.int64).max, dtype=torch.int64)
    out_v[rows, slot] = values[rows, cols]
    out_i[rows, slot] = indices[rows, cols]
    return out_v, out_i


def merge_topk(run_v: Tensor, run_i: Tensor, block_v: Tensor, block_i: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Merge a block of candidates ``[P, c]`` into running top-``k`` lists ``[P, <= k]`` (see
    :func:`select_topk` for the order)."""
    block_v, block_i = candidates(block_v, block_i, k)
    if run_v.shape[1] == 0:
        return select_topk(block_v, block_i, k)
    return select_topk(torch.cat([run_v, block_v], dim=1), torch.cat([run_i, block_i], dim=1), k)


def compute_dtype_for(device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype the gallery is scored in: ``dtype`` when given, else float16 on CUDA (tensor cores) and
    float32 elsewhere. On the CPU, with no ``dtype`` given, a float16/bfloat16 gallery chunk is scored in
    its own dtype (no float32 copy) whenever the queries hold their values exactly in it: for float16 the
    CPU kernel widens exactly and accumulates in float32, so the scores are the float32 ones, bit for bit;
    bfloat16 runs the kernel's bfloat16 path (channel pairs, VDPBF16PS where the CPU has it), whose scores
    are bit-identical whatever the chunking and differ from float32's only in the summation order."""
    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _as_tensor(chunk: ChunkLike) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk


def _as_chunk(chunk: ChunkLike, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _as_tensor(chunk).to(device=device, dtype=dtype)


_REDUCED = (torch.float16, torch.bfloat16)


def _reduced_queries(q: Tensor, device: torch.device, compute_dtype: Optional[torch.dtype]) -> dict:
    """The queries in float16/bfloat16 where those hold their values exactly, for CPU scoring by default.

    The CPU kernel widens float16 maps to float32 while packing and every product of two such numbers is
    exact in float32, so scoring a float16 gallery chunk (as the index stores it) against float16 queries
    gives the bits of float32 scoring of the same values, without a float32 copy of the chunk. A bfloat16
    chunk is scored by the kernel's bfloat16 path (float32 accumulation in the order of VDPBF16PS; the
    same bits as dense bfloat16 scoring). Only used when the queries' values survive the cast (e.g. maps
    read from an index).
    """
    if compute_dtype is not None or device.type != "cpu" or not q.is_floating_point():
        return {}
    out = {}
    for dt in _REDUCED:
        r = q if q.dtype == dt else q.to(dt)
        if q.dtype == dt or torch.equal(r.to(q.dtype), q):
            out[dt] = r
    return out


def _chunk_and_queries(chunk: ChunkLike, q: Tensor, reduced: dict, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[Tensor, Tensor]:
    """A gallery chunk and the queries to score it with: both in the chunk's own float16/bfloat16 when the
    queries hold their values exactly in it (no copy of the chunk), else both in ``dtype``."""
    t = _as_tensor(chunk)
    if t.dtype in reduced and t.device == device:
        return t, reduced[t.dtype]
    return _as_chunk(t, device, dtype), q


def streaming_topk(query_maps: Tensor, chunks: Iterable[ChunkLike], weight: Tensor,
                   bias: Union[Tensor, float, None], k: int, *, device: Union[str, torch.device, None] = None,
                   compute_dtype: Optional[torch.dtype] = None,
                   progress: Optional[Callable[[int], None]] = None) -> Tuple[Tensor, Tensor]:
    """Top-``k`` QAConv scores of every query over a gallery given as consecutive chunks of maps.

    Args:
        query_maps: ``[P, d, h, w]`` query feature maps.
        chunks: the gallery's maps in order, as ``[n_i, d, h, w]`` tensors or arrays (any float dtype,
            e.g. float16 from a file); chunk ``i`` holds gallery indices ``sum(n_<i) ...``.
        weight, bias: the folded head (``[2L]`` and a scalar), e.g. ``QAConv.folded()``.
        k: how many to keep; at most the gallery size.
        device: where to score (default: the queries' device). compute_dtype: what queries and chunks
            are cast to before :func:`qaconv_ext.qaconv_score` (default :func:`compute_dtype_for`).
        progress: called with each chunk's size after it is scored.

    Returns:
        ``(scores [P, k] float32, indices [P, k] int64)`` on the CPU, each row by score descending, ties
        by the smaller index: exactly the first ``k`` columns of a stable descending sort of the dense
        scores. Memory: ``O(P * k + P * chunk)`` beyond one chunk of maps.
    """
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = int(k)
    device = torch.device(device) if device is not None else query_maps.device
    dtype = compute_dtype_for(device, compute_dtype)
    q = query_maps.detach().to(device, dtype)
    reduced = _reduced_queries(query_maps.detach().to(device), device, compute_dtype)
    w, b = score_weights(weight, bias, dtype, device)
    P = q.shape[0]
    run_v = torch.empty(P, 0, dtype=torch.float32)
    run_i = torch.empty(P, 0, dtype=torch.int64)
    offset = 0
    with torch.no_grad():
        for chunk in chunks:
            g, qq = _chunk_and_queries(chunk, q, reduced, device, dtype)
            n = g.shape[0]
            if n == 0:
                continue
            s = qaconv_score(qq, g, w, b).float().cpu()
            idx = torch.arange(offset, offset + n, dtype=torch.int64).expand(P, n)
            run_v, run_i = merge_topk(run_v, run_i, s, idx, k)
            offset += n
            if progress is not None:
                progress(n)
    if offset < k:
        raise ValueError(f"k={k} is larger than the gallery ({offset} maps)")
    return run_v, run_i


def global_descriptors(maps: ChunkLike) -> Tensor:
    """The cheap global descriptor of feature maps ``[n, d, h, w]``: the average over locations,
    L2-normalised -> float32 ``[n, d]`` (computed in float32 whatever the input dtype)."""
    t = torch.from_numpy(np.ascontiguousarray(maps)) if isinstance(maps, np.ndarray) else maps
    t = t.detach().to("cpu", torch.float32)
    if t.dim() != 4:
        raise ValueError(f"expected feature maps [n, d, h, w], got shape {tuple(t.shape)}")
    return F.normalize(t.mean(dim=(2, 3)), dim=1)


def descriptor_topk(query_desc: Tensor, chunks: Iterable[ChunkLike], k: int) -> Tuple[Tensor, Tensor]:
    """Top-``k`` cosine similarities of query descriptors ``[P, d]`` over gallery descriptors streamed in
    consecutive chunks ``[n_i, d]`` (same order rules as :func:`streaming_topk`); returns
    ``(similarities [P, k'], indices [P, k'])`` with ``k' = min(k, gallery size)``."""
    q = query_desc.detach().to("cpu", torch.float32)
    P = q.shape[0]
    run_v = torch.empty(P, 0, dtype=torch.float32)
    run_i = torch.empty(P, 0, dtype=torch.int64)
    offset = 0
    for chunk in chunks:
        g = _as_chunk(chunk, torch.device("cpu"), torch.float32)
        n = g.shape[0]
        if n == 0:
            continue
        s = q @ g.t()
        run_v, run_i = merge_topk(run_v, run_i, s, torch.arange(offset, offset + n).expand(P, n), k)
        offset += n
    return run_v, run_i


def rerank_shortlist(query_maps: Tensor, shortlist: Tensor, fetch: Callable[[np.ndarray], ChunkLike],
                     weight: Tensor, bias: Union[Tensor, float, None], k: int, *,
                     device: Union[str, torch.device, None] = None,
                     compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Exact QAConv scores of each query against its own shortlisted gallery indices, top ``k`` of them.

    ``shortlist`` is ``[P, M]`` gallery indices (``M >= k``); ``fetch(sorted_indices)`` returns those
    gallery maps ``[m, d, h, w]`` in that order. Returns ``(scores [P, k], indices [P, k])`` ordered as
    in :func:`streaming_topk` (so equal to the exhaustive result whenever the shortlist holds the
    exhaustive top ``k``).
    """
    device = torch.device(device) if device is not None else query_maps.device
    dtype = compute_dtype_for(device, compute_dtype)
    w, b = score_weights(weight, bias, dtype, device)
    P, M = shortlist.shape
    if M < k:
        raise ValueError(f"the shortlist ({M}) must hold at least k={k} entries")
    out_v = torch.empty(P, k, dtype=torch.float32)
    out_i = torch.empty(P, k, dtype=torch.int64)
    with torch.no_grad():
        for p in range(P):
            cand = torch.unique(shortlist[p])  # sorted ascending, duplicates (none expected) dropped
            qp = query_maps[p:p + 1].detach().to(device)
            maps, qq = _chunk_and_queries(fetch(cand.numpy()), qp.to(dtype), _reduced_queries(qp, device, compute_dtype),
                                          device, dtype)
            s = qaconv_score(qq, maps, w, b).float().cpu()
            v, i = select_topk(s, cand[None], k)
            out_v[p], out_i[p] = v[0], i[0]
    return out_v, out_i


def iterate_blocks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``size`` covering ``range(n)``
    (:func:`qaconv_ext.scoring.blocks`)."""
    return iter(blocks(n, size))
