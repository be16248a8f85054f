"""Ranking metrics for re-identification: CMC, mAP and mINP (Market-1501 single-query protocol)."""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

from ..utils.matrix_checks import check_matrix
from .protocol import junk_mask

__all__ = ["evaluate_rank"]

ArrayLike = Union[np.ndarray, torch.Tensor, Any]

# Elements (rows x gallery) sorted per block: bounds the temporary int64 index arrays to ~64 MB each.
_BLOCK_ELEMENTS = 1 << 23


def _as_tensor(x: ArrayLike, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    if not torch.is_tensor(x):
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    x = x.detach()
    if device is not None:
        x = x.to(device)
    return x


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    return_minp: bool = False,
) -> Union[Tuple[np.ndarray, float], Tuple[np.ndarray, float, float]]:
    """CMC curve, mAP (and optionally mINP) with torchreid's conventions.

    ``distmat`` is ``[num_query, num_gallery]`` with lower = more similar (numpy array or torch tensor; a
    CUDA tensor is ranked on its device). For each query, gallery entries with the query's pid *and*
    camera are removed; queries left with no true match are skipped. CMC uses the first match; AP is the
    mean of the precision at each true match; INP is ``num_matches / (rank of the last match)``
    (Ye et al., AGW). Sorting is stable, so equal distances keep gallery order. As in torchreid,
    ``max_rank`` is clipped to the gallery size.

    Returns ``(cmc, mAP)`` or ``(cmc, mAP, mINP)``; ``cmc`` is float32 ``[max_rank]``, the others floats.
    A distance that is NaN or infinite raises ``ValueError`` (saying how many and where the first is):
    sorting would place it somewhere arbitrary and give plausible-looking metrics.
    """
    dist = _as_tensor(distmat, "distmat")
    if dist.dim() != 2:
        raise ValueError(f"distmat: expected a 2-D matrix, got shape {tuple(dist.shape)}")
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    check_matrix(dist, "distmat", labels=("query", "gallery"))
    device = dist.device
    num_q, num_g = dist.shape
    ids = {}
    for name, arr, n in (("q_pids", q_pids, num_q), ("q_camids", q_camids, num_q),
                         ("g_pids", g_pids, num_g), ("g_camids", g_camids, num_g)):
        t = _as_tensor(arr, name, device).reshape(-1)
        if t.shape[0] != n:
            raise ValueError(f"{name}: length {t.shape[0]} does not match distmat shape {tuple(dist.shape)}")
        ids[name] = t
    q_pids, q_camids, g_pids, g_camids = ids["q_pids"], ids["q_camids"], ids["g_pids"], ids["g_camids"]
    if num_g == 0:
        raise ValueError("distmat: the gallery is empty")
    if max_rank < 1:
        raise ValueError(f"max_rank: must be >= 1, got {max_rank}")
    max_rank = min(int(max_rank), num_g)

    cmc_hits = torch.zeros(max_rank, dtype=torch.int64, device=device)  # first matches at each rank
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_valid = 0
    block = max(1, _BLOCK_ELEMENTS // num_g)
    for start in range(0, num_q, block):
        stop = min(start + block, num_q)
        order = torch.sort(dist[start:stop], dim=1, stable=True).indices
        ranked_pids = g_pids[order]
        same_pid = ranked_pids == q_pids[start:stop, None]
        junk = junk_mask(q_pids[start:stop, None], q_camids[start:stop, None], ranked_pids, g_camids[order])
        del order, ranked_pids
        good = same_pid & ~junk
        # 1-based position of every entry in the list that remains once junk is removed
        position = torch.cumsum(~junk, dim=1)
        rows, cols = good.nonzero(as_tuple=True)  # row-major: each query's matches in rank order
        if rows.numel() == 0:
            continue
        pos = position[rows, cols].double()
        num_good = torch.bincount(rows, minlength=stop - start)
        offsets = torch.cumsum(num_good, 0) - num_good
        hit_number = torch.arange(rows.numel(), device=device) - offsets[rows] + 1
        precision_sum = torch.zeros(stop - start, dtype=torch.float64, device=device)
        precision_sum.index_add_(0, rows, hit_number.double() / pos)
        valid = num_good > 0
        n = num_good[valid].double()
        ap_sum += (precision_sum[valid] / n).sum()
        is_first = hit_number == 1
        is_last = hit_number == num_good[rows]
        first = position[rows[is_first], cols[is_first]]  # already in row order
        last = pos[is_last]
        inp_sum += (n / last).sum()
        first = first[first <= max_rank]
        cmc_hits += torch.bincount(first - 1, minlength=max_rank)[:max_rank]
        num_valid += int(valid.sum())

    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery (after removing same-camera matches)")
    cmc = (torch.cumsum(cmc_hits, 0).double() / num_valid).float().cpu().numpy()
    mAP = float(ap_sum) / num_valid
    if return_minp:
        return cmc, mAP, float(inp_sum) / num_valid
    return cmc, mAP
