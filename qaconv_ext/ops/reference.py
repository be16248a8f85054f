"""Chunked pure-PyTorch QAConv matching.

This is the oracle the fused kernels are tested against, the fallback for devices the extension was
not built for, and the unfused baseline of the benchmarks. It materialises the local similarity
tensor one chunk of ``[p, n, Lq, Lg]`` at a time, never the whole ``[P, N, Lq, Lg]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .dtypes import accumulation_dtype

Tensor = torch.Tensor

__all__ = ["qaconv_match", "qaconv_score", "match_backward", "similarity", "similarity_at", "centroid_score",
           "centroid_score_u8"]


def _flatten_locations(x: Tensor) -> Tensor:
    """``[B, d, h, w]`` -> ``[B, d, L]`` (a view when possible)."""
    return x.flatten(2)


def _chunks(P: int, N: int, Lq: int, Lg: int, element_size: int, budget_bytes: int,
            chunk: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    if chunk is not None:
        return max(1, int(chunk[0])), max(1, int(chunk[1]))
    per_pair = max(1, Lq * Lg * element_size * 3)  # S plus two max passes' temporaries
    pairs = max(1, budget_bytes // per_pair)
    cn = min(N, pairs) if N else 1
    cp = min(P, max(1, pairs // max(cn, 1))) if P else 1
    return max(cp, 1), max(cn, 1)


def similarity(query: Tensor, gallery: Tensor) -> Tensor:
    """The full local similarity tensor ``S[p, n, s, r]`` (small inputs only)."""
    return torch.einsum("pcs,ncr->pnsr", _flatten_locations(query), _flatten_locations(gallery))


def similarity_at(query: Tensor, gallery: Tensor, indices: Tensor, chunk: int = 16) -> Tensor:
    """The local similarities at given locations, ``[P, N, Lq + Lg]`` in the accumulation dtype.

    Entry ``s < Lq`` of pair ``(p, n)`` is ``<query[p, :, s], gallery[n, :, indices[p, n, s]]>``; entry
    ``Lq + r`` is ``<query[p, :, indices[p, n, Lq + r]], gallery[n, :, r]>``. At the argmax indices of
    :func:`qaconv_match` these are its values; being bilinear in the maps, the tangent of the match in a
    direction ``(dq, dg)`` is ``similarity_at(dq, gallery, indices) + similarity_at(query, dg, indices)``.
    Differentiable (gathers and products).
    """
    acc = accumulation_dtype(query.dtype)
    P, N = query.shape[0], gallery.shape[0]
    qt = _flatten_locations(query).to(acc).transpose(1, 2)  # [P, Lq, d]
    gt = _flatten_locations(gallery).to(acc).transpose(1, 2)  # [N, Lg, d]
    Lq, Lg = qt.shape[1], gt.shape[1]
    n_idx = torch.arange(N, device=query.device)
    rows = []
    for p0 in range(0, P, chunk):
        p1 = min(P, p0 + chunk)
        p_idx = torch.arange(p0, p1, device=query.device)
        to_gallery = (qt[p0:p1, None] * gt[n_idx[None, :, None], indices[p0:p1, :, :Lq]]).sum(-1)
        to_query = (qt[p_idx[:, None, None], indices[p0:p1, :, Lq:]] * gt[None]).sum(-1)
        rows.append(torch.cat([to_gallery, to_query], dim=2))
    return torch.cat(rows, dim=0) if rows else qt.new_zeros((P, N, Lq + Lg))


def qaconv_match(query: Tensor, gallery: Tensor, return_indices: bool = False,
                 chunk: Optional[Tuple[int, int]] = None, budget_bytes: int = 256 << 20
                 ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Both-direction max of the local similarities, computed chunk by chunk.

    Returns values ``[P, N, Lq + Lg]`` in the input dtype (and the int64 argmax indices). Differentiable
    through PyTorch's own autograd, which makes it the gradient oracle for the fused op.
    """
    P, N = query.shape[0], gallery.shape[0]
    q, g = _flatten_locations(query), _flatten_locations(gallery)
    Lq, Lg = q.shape[2], g.shape[2]
    cp, cn = _chunks(P, N, Lq, Lg, query.element_size(), budget_bytes, chunk)
    rows_v, rows_i = [], []
    for p0 in range(0, P, cp):
        cols_v, cols_i = [], []
        for n0 in range(0, N, cn):
            s = torch.einsum("pcs,ncr->pnsr", q[p0:p0 + cp], g[n0:n0 + cn])
            m1, i1 = s.max(dim=3)  # per query location: best gallery location
            m2, i2 = s.max(dim=2)  # per gallery location: best query location
            cols_v.append(torch.cat([m1, m2], dim=2))
            if return_indices:
                cols_i.append(torch.cat([i1, i2], dim=2))
        if cols_v:
            rows_v.append(torch.cat(cols_v, dim=1))
            if return_indices:
                rows_i.append(torch.cat(cols_i, dim=1))
    if rows_v:
        values = torch.cat(rows_v, dim=0)
    else:
        values = query.new_zeros((P, N, Lq + Lg))
    if not return_indices:
        return values
    indices = torch.cat(rows_i, dim=0) if rows_i else torch.zeros(
        (P, N, Lq + Lg), dtype=torch.long, device=query.device)
    return values, indices


def qaconv_score(query: Tensor, gallery: Tensor, weight: Tensor, bias: Optional[Union[Tensor, float]] = None,
                 chunk: Optional[Tuple[int, int]] = None, budget_bytes: int = 256 << 20) -> Tensor:
    """``values @ weight + bias`` in float32 (float64 for float64 inputs), chunk by chunk."""
    acc = accumulation_dtype(query.dtype)
    P, N = query.shape[0], gallery.shape[0]
    q, g = _flatten_locations(query), _flatten_locations(gallery)
    Lq, Lg = q.shape[2], g.shape[2]
    cp, cn = _chunks(P, N, Lq, Lg, query.element_size(), budget_bytes, chunk)
    w = weight.to(acc).reshape(-1)
    out = torch.empty((P, N), dtype=acc, device=query.device)
    for p0 in range(0, P, cp):
        for n0 in range(0, N, cn):
            s = torch.einsum("pcs,ncr->pnsr", q[p0:p0 + cp], g[n0:n0 + cn])
            v = torch.cat([s.amax(dim=3), s.amax(dim=2)], dim=2).to(acc)
            out[p0:p0 + cp, n0:n0 + cn] = v @ w
    if bias is not None:
        out = out + (bias.to(acc).reshape(()) if isinstance(bias, Tensor) else float(bias))
    return out


def match_backward(grad_values: Tensor, indices: Tensor, query: Tensor, gallery: Tensor,
                   chunk: int = 16, output_mask: Sequence[bool] = (True, True)) -> Tuple[Tensor, Tensor]:
    """Sparse gradient of :func:`qaconv_match` through the argmax indices (gather + scatter-add).

    ``grad_values`` and ``indices`` are ``[P, N, Lq + Lg]``. Returns gradients shaped like the inputs,
    accumulated in float32 (float64 for float64 inputs); a gradient switched off in ``output_mask``
    (``(query, gallery)``) is not computed and comes back as an empty ``[0]`` tensor.
    """
    need_q, need_g = (bool(m) for m in output_mask)
    acc = accumulation_dtype(query.dtype)
    P, d = query.shape[:2]
    N = gallery.shape[0]
    qt = _flatten_locations(query).to(acc).transpose(1, 2)  # [P, Lq, d]
    gt = _flatten_locations(gallery).to(acc).transpose(1, 2)  # [N, Lg, d]
    Lq, Lg = qt.shape[1], gt.shape[1]
    gv = grad_values.to(acc)
    dq = torch.zeros((P if need_q else 0, Lq, d), dtype=acc, device=query.device)
    dg = torch.zeros((N if need_g else 0, Lg, d), dtype=acc, device=query.device)
    n_idx = torch.arange(N, device=query.device)
    for p0 in range(0, P, chunk):
        p1 = min(P, p0 + chunk)
        g1, i1 = gv[p0:p1, :, :Lq], indices[p0:p1, :, :Lq]  # best gallery location per query location
        g2, i2 = gv[p0:p1, :, Lq:], indices[p0:p1, :, Lq:]  # best query location per gallery location
        # dQ[p, s] += g1 * G[n, i1];  dG[n, i1] += g1 * Q[p, s]
        p_idx = torch.arange(p0, p1, device=query.device)
        if need_q:
            gathered = gt[n_idx[None, :, None], i1]  # [p, N, Lq, d]
            dq[p0:p1] += (g1[..., None] * gathered).sum(dim=1)
            # dQ[p, i2] += g2 * G[n, r]
            src = g2[..., None] * gt[None]  # [p, N, Lg, d]
            flat = ((p_idx[:, None, None] - p0) * Lq + i2).reshape(-1)
            part = torch.zeros(((p1 - p0) * Lq, d), dtype=acc, device=query.device)
            part.index_add_(0, flat, src.reshape(-1, d))
            dq[p0:p1] += part.view(p1 - p0, Lq, d)
        if need_g:
            src = g1[..., None] * qt[p0:p1, None, :, :]  # [p, N, Lq, d]
            flat = (n_idx[None, :, None] * Lg + i1).reshape(-1)
            dg.view(N * Lg, d).index_add_(0, flat, src.reshape(-1, d))
            # dG[n, r] += g2 * Q[p, i2]
            gathered_q = qt[p_idx[:, None, None], i2]  # [p, N, Lg, d]
            dg += (g2[..., None] * gathered_q).sum(dim=0)
    dq = dq.transpose(1, 2).reshape(query.shape).to(query.dtype).contiguous() if need_q else query.new_empty((0,))
    dg = (dg.transpose(1, 2).reshape(gallery.shape).to(gallery.dtype).contiguous() if need_g
          else gallery.new_empty((0,)))
    return dq, dg


def centroid_score(table: Tensor, codes: Tensor, weight: Tensor, bias: Optional[Union[Tensor, float]] = None,
                   chunk: int = 256) -> Tensor:
    """QAConv scores of centroid-coded gallery maps from per-query tables (the oracle of
    ``qaconv_ext::centroid_score``), chunk by chunk over the maps.

    ``table`` ``[P, K, Lq]``: similarity of centroid ``k`` with query location ``i``; ``codes`` ``[N, Lg]``
    centroid ids (any integer dtype). Score of pair ``(p, n)``: ``sum_i w[i] max_j table[p, c_nj, i] +
    sum_j w[Lq + j] max_i table[p, c_nj, i] + bias``, in ``table``'s dtype (float64 stays float64).
    """
    return _coded_scores(table, table.amax(dim=2), codes, weight, bias, chunk)


def centroid_score_u8(table: Tensor, scale: Tensor, colmax: Tensor, codes: Tensor, weight: Tensor,
                      bias: Optional[Union[Tensor, float]] = None, dtype: torch.dtype = torch.float64,
                      chunk: int = 256) -> Tensor:
    """The oracle of ``qaconv_ext::centroid_score_u8``: :func:`centroid_score`'s row term from the decoded
    table ``offset + step * table`` (``scale[p] = (offset, step)``), its column term from ``colmax``
    ``[P, K]``; in ``dtype``."""
    decoded = scale[:, 0, None, None].to(dtype) + scale[:, 1, None, None].to(dtype) * table.to(dtype)
    return _coded_scores(decoded, colmax.to(dtype), codes, weight, bias, chunk)


def _coded_scores(table: Tensor, colmax: Tensor, codes: Tensor, weight: Tensor,
                  bias: Optional[Union[Tensor, float]], chunk: int) -> Tensor:
    P, K, Lq = table.shape
    ids = codes.to(torch.int64)
    N, Lg = ids.shape
    w = weight.reshape(-1).to(table.dtype)
    out = table.new_empty((P, N))
    for n0 in range(0, N, chunk):
        c = ids[n0:n0 + chunk]  # [n, Lg]
        rows = table[:, c].amax(dim=2)  # [P, n, Lg, Lq] -> [P, n, Lq]
        cols = colmax[:, c]  # [P, n, Lg]
        out[:, n0:n0 + chunk] = rows @ w[:Lq] + cols @ w[Lq:]
    if bias is not None:
        out = out + (bias.to(table.dtype).reshape(()) if isinstance(bias, Tensor) else float(bias))
    return out
