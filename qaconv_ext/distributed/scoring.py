"""Sharded feature extraction and gallery scoring: every rank works on its shard with the fused op,
rank 0 assembles the results in rank order (bit for bit those of one process on the CPU)."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import DEFAULT_PRESET
from ..scoring import (BlockJob, assemble_self_scores, deal_by_pairs, extract_features, score_blocks,
                       score_jobs, select_topk, self_score_blocks, self_score_jobs)
from .collectives import all_gather_objects, all_gather_rows, gather_rows
from .env import rank, world_size
from .sharding import shard_range

__all__ = ["sharded_extract_features", "sharded_score_blocks", "sharded_self_score_blocks", "self_score_shares",
           "topk_rows", "sharded_topk"]


def sharded_extract_features(model: nn.Module, records: Sequence[Any], height: int, width: int,
                             batch_size: int = 64, device: Union[str, torch.device] = "cpu", workers: int = 0,
                             progress: bool = True, desc: str = "features", gather: bool = True,
                             out_device: Union[str, torch.device] = "cpu", preprocess: str = DEFAULT_PRESET,
                             amp: Optional[bool] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`~qaconv_ext.scoring.extract_features` over this rank's contiguous shard of ``records``
    (shards start on batch boundaries, so every batch is one of the one-process run); ``preprocess``,
    ``amp`` and ``dtype`` as there.

    ``gather``: return the features of all records on every rank (rank order = record order);
    otherwise only this rank's shard (``shard_range(len(records), rank, world, align=batch_size)``).
    """
    part = shard_range(len(records), rank(), world_size(), align=batch_size)
    recs = [records[i] for i in part]
    options = dict(out_device=out_device, preprocess=preprocess, amp=amp, dtype=dtype)
    if recs:
        local = extract_features(model, recs, height, width, batch_size, device, workers, progress, desc, **options)
    else:  # more ranks than batches: an empty shard with the right trailing shape
        local = extract_features(model, list(records[:1]), height, width, 1, device, workers, False, desc,
                                 **options)[:0]
    return all_gather_rows(local) if gather else local


def sharded_score_blocks(head: nn.Module, query_fea: torch.Tensor, local_gallery_fea: torch.Tensor,
                         query_chunk: int = 512, gallery_chunk: int = 2048, progress: bool = True,
                         desc: str = "QAConv scores", device: Union[str, torch.device, None] = None,
                         dst: Optional[int] = 0) -> Optional[torch.Tensor]:
    """QAConv logits of every query against the gallery, the gallery split across ranks.

    Every rank passes all queries and its own gallery shard (``[n_r, d, h, w]``; the shards in rank
    order make the gallery) and scores it with :func:`~qaconv_ext.scoring.score_blocks`. Rank
    ``dst`` returns the assembled ``[P, N]`` float32 CPU scores, the other ranks ``None``;
    ``dst=None`` returns them on every rank. In one process this is ``score_blocks``. On the CPU the
    scores equal those of one process bit for bit (the kernel's sums do not depend on the blocking).
    """
    local = score_blocks(head, query_fea, local_gallery_fea, query_chunk, gallery_chunk, progress, desc, device)
    if world_size() == 1:
        return local
    cols = local.t().contiguous()  # gather along the gallery axis: rows of the transpose
    full = all_gather_rows(cols) if dst is None else gather_rows(cols, dst)
    return None if full is None else full.t().contiguous()


def self_score_shares(head: nn.Module, n: int, chunk: int, world: int) -> Tuple[List[BlockJob], List[List[int]]]:
    """The blocks of an ``n x n`` self-scoring and each rank's share of them, dealt by pair count
    (:func:`~qaconv_ext.scoring.deal_by_pairs`): the ranks' pair counts differ by at most one block. The
    blocks are at most ``chunk`` wide, and narrower when that is needed for at least four per rank."""
    size = max(1, min(int(chunk), -(-n // (4 * world)))) if world > 1 else int(chunk)
    jobs = self_score_jobs(head, n, size)
    return jobs, deal_by_pairs(jobs, world)


def sharded_self_score_blocks(head: nn.Module, fea: torch.Tensor, chunk: int = 1024, progress: bool = True,
                              desc: str = "QAConv self scores", device: Union[str, torch.device, None] = None,
                              dst: int = 0) -> Optional[torch.Tensor]:
    """:func:`~qaconv_ext.scoring.self_score_blocks` with its blocks dealt to the ranks by pair count
    (:func:`self_score_shares`).

    Every rank passes the whole set ``fea``; rank ``dst`` returns the ``[N, N]`` scores, the others
    ``None``. On the CPU they equal the one-process call's bit for bit.
    """
    world = world_size()
    if world == 1:
        return self_score_blocks(head, fea, chunk, progress, desc, device)
    device = torch.device(device) if device is not None else fea.device
    jobs, shares = self_score_shares(head, fea.shape[0], chunk, world)
    mine = [jobs[i] for i in shares[rank()]]
    flat = [s.reshape(-1) for s in score_jobs(head, fea, mine, device)]
    full = gather_rows(torch.cat(flat) if flat else torch.zeros(0), dst)
    if full is None:
        return None
    ordered = [jobs[i] for share in shares for i in share]   # rank order, as gathered
    parts, pos = [], 0
    for (a0, a1), (b0, b1) in ordered:
        k = (a1 - a0) * (b1 - b0)
        parts.append(full[pos:pos + k].view(a1 - a0, b1 - b0))
        pos += k
    return assemble_self_scores(head, fea.shape[0], ordered, parts)


def topk_rows(scores: torch.Tensor, k: int, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest scores of every row ``[P, N]`` and their column indices (plus ``offset``), in
    :func:`~qaconv_ext.scoring.select_topk`'s order (best first; equal scores in column order). ``k``
    is capped at ``N``."""
    cols = torch.arange(offset, offset + scores.shape[1], dtype=torch.long).expand(scores.shape[0], -1)
    return select_topk(scores, cols, int(k))


def sharded_topk(head: nn.Module, query_fea: torch.Tensor, local_gallery_fea: torch.Tensor, k: int,
                 query_chunk: int = 512, gallery_chunk: int = 2048, progress: bool = True,
                 desc: str = "QAConv scores", device: Union[str, torch.device, None] = None,
                 dst: int = 0) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Every query's ``k`` best gallery images when the ``[P, N]`` scores are too large for one rank:
    each rank scores its gallery shard (shards in rank order make the gallery) and keeps its ``k`` best
    per query; rank ``dst`` merges them into ``(scores [P, k], gallery indices [P, k])``, best first,
    ties in gallery order -- :func:`topk_rows` of the whole score matrix. ``None`` on the other ranks."""
    local = score_blocks(head, query_fea, local_gallery_fea, query_chunk, gallery_chunk, progress, desc, device)
    sizes = all_gather_objects(int(local_gallery_fea.shape[0]))
    offset = sum(sizes[:rank()])
    values, index = topk_rows(local, k, offset)
    if world_size() == 1:
        return values, index
    # gather along the query axis's transpose: rows are candidates, so shards of different k concatenate
    all_values = gather_rows(values.t().contiguous(), dst)
    all_index = gather_rows(index.t().contiguous(), dst)
    if all_values is None or all_index is None:
        return None
    cand_v, cand_i = all_values.t(), all_index.t()  # [P, sum of k_r], in rank order = gallery order
    return select_topk(cand_v, cand_i, int(k))
