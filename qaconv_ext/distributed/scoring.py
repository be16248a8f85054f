"""Sharded feature extraction and gallery scoring: every rank works on its shard with the fused op,
rank 0 assembles the results in rank order (bit for bit those of one process on the CPU)."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..evaluation.scoring import _blocks, _folded, extract_features, score_blocks
from .collectives import all_gather_objects, all_gather_rows, gather_rows
from .env import rank, world_size
from .sharding import shard_range

__all__ = ["sharded_extract_features", "sharded_score_blocks", "sharded_self_score_blocks", "topk_rows",
           "sharded_topk"]

def sharded_extract_features(model: nn.Module, records: Sequence[Any], height: int, width: int,
                             batch_size: int = 64, device: Union[str, torch.device] = "cpu", workers: int = 0,
                             progress: bool = True, desc: str = "features", gather: bool = True,
                             out_device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """:func:`~qaconv_ext.evaluation.extract_features` over this rank's contiguous shard of ``records``
    (shards start on batch boundaries, so every batch is one of the one-process run).

    ``gather``: return the features of all records on every rank (rank order = record order);
    otherwise only this rank's shard (``shard_range(len(records), rank, world, align=batch_size)``).
    """
    part = shard_range(len(records), rank(), world_size(), align=batch_size)
    recs = [records[i] for i in part]
    if recs:
        local = extract_features(model, recs, height, width, batch_size, device, workers, progress, desc,
                                 out_device=out_device)
    else:  # more ranks than batches: an empty shard with the right trailing shape
        probe = extract_features(model, list(records[:1]), height, width, 1, device, workers, False, desc,
                                 out_device=out_device)
        local = probe[:0]
    return all_gather_rows(local) if gather else local


def sharded_score_blocks(head: nn.Module, query_fea: torch.Tensor, local_gallery_fea: torch.Tensor,
                         query_chunk: int = 512, gallery_chunk: int = 2048, progress: bool = True,
                         desc: str = "QAConv scores", device: Union[str, torch.device, None] = None,
                         dst: Optional[int] = 0) -> Optional[torch.Tensor]:
    """QAConv logits of every query against the gallery, the gallery split across ranks.

    Every rank passes all queries and its own gallery shard (``[n_r, d, h, w]``; the shards in rank
    order make the gallery) and scores it with :func:`~qaconv_ext.evaluation.score_blocks`. Rank
    ``dst`` returns the assembled ``[P, N]`` float32 CPU scores, the other ranks ``None``;
    ``dst=None`` returns them on every rank. In one process this is ``score_blocks``.

    On the CPU the scores equal those of one process bit for bit when ``h * w`` is a multiple of 4
    (24 x 8 and every map size of this package's models). Otherwise a score may differ in its last
    bit: the CPU kernel's per-pair GEMM then rounds depending on where the pair's tile sits in memory,
    which depends on the gallery's size and the pair's position in the call.
    """
    local = score_blocks(head, query_fea, local_gallery_fea, query_chunk, gallery_chunk, progress, desc, device)
    if world_size() == 1:
        return local
    cols = local.t().contiguous()  # gather along the gallery axis: rows of the transpose
    full = all_gather_rows(cols) if dst is None else gather_rows(cols, dst)
    return None if full is None else full.t().contiguous()


def _self_blocks(head: nn.Module, n: int, chunk: int) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    blocks = _blocks(n, chunk)
    if getattr(head, "layout", "eccv") == "v2":  # symmetric: blocks on and above the diagonal, mirrored
        return [(a, b) for i, a in enumerate(blocks) for b in blocks[i:]]
    return [(a, b) for b in blocks for a in blocks]


def sharded_self_score_blocks(head: nn.Module, fea: torch.Tensor, chunk: int = 1024, progress: bool = True,
                              desc: str = "QAConv self scores", device: Union[str, torch.device, None] = None,
                              dst: int = 0) -> Optional[torch.Tensor]:
    """:func:`~qaconv_ext.evaluation.self_score_blocks` with its blocks dealt round-robin to the ranks.

    Every rank passes the whole set ``fea``; rank ``dst`` returns the ``[N, N]`` scores assembled
    from the same blocks as the one-process call (so the same values bit for bit), the others
    ``None``.
    """
    from ..evaluation.scoring import self_score_blocks
    from ..ops import qaconv_score

    world = world_size()
    if world == 1:
        return self_score_blocks(head, fea, chunk, progress, desc, device)
    device = torch.device(device) if device is not None else fea.device
    weight, bias = _folded(head, device, fea.dtype)
    jobs = _self_blocks(head, fea.shape[0], chunk)
    mine = jobs[rank()::world]
    flat: List[torch.Tensor] = []
    with torch.no_grad():
        for (a0, a1), (b0, b1) in mine:
            a = fea[a0:a1].to(device)
            b = fea[b0:b1].to(device)
            flat.append(qaconv_score(a, b, weight, bias).float().cpu().reshape(-1))
    local = torch.cat(flat) if flat else torch.zeros(0)
    full = gather_rows(local, dst)
    if full is None:
        return None
    N = fea.shape[0]
    out = torch.empty(N, N, dtype=torch.float32)
    sizes = [sum((a1 - a0) * (b1 - b0) for (a0, a1), (b0, b1) in jobs[r::world]) for r in range(world)]
    offset = 0
    symmetric = getattr(head, "layout", "eccv") == "v2"
    for r in range(world):
        pos = offset
        for (a0, a1), (b0, b1) in jobs[r::world]:
            k = (a1 - a0) * (b1 - b0)
            s = full[pos:pos + k].view(a1 - a0, b1 - b0)
            out[a0:a1, b0:b1] = s
            if symmetric and b0 != a0:
                out[b0:b1, a0:a1] = s.t()
            pos += k
        offset += sizes[r]
    return out


def topk_rows(scores: torch.Tensor, k: int, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest scores of every row ``[P, N]`` and their column indices (plus ``offset``), best
    first; equal scores in column order. ``k`` is capped at ``N``."""
    k = min(int(k), scores.shape[1])
    cols = torch.arange(scores.shape[1], dtype=torch.long).expand(scores.shape[0], -1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), cols.gather(1, order) + offset


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
    order = topk_rows(cand_v, k)[1]
    return cand_v.gather(1, order), cand_i.gather(1, order)
