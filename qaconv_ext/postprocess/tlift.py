"""Temporal Lifting (TLift): re-weight matching scores with within-camera temporal co-occurrence.

For a probe ``i`` seen by camera ``c`` and every gallery camera ``g``:

* ``R_i``: the probes of camera ``c`` whose time differs from ``t_i`` by less than ``tau`` (``i`` included);
* ``thr``: the K-th largest entry of the whole block ``score[R_i, gallery of g]`` (its smallest entry when
  the block has at most ``K`` entries);
* pivots: the gallery column of *every* block entry ``>= thr`` (a column found in several rows counts
  several times; ties at ``thr`` all count);
* ``w(i, x) = mean over pivots y of exp(-(t_y - t_x)^2 / sigma^2)`` for each gallery ``x`` of camera ``g``.

The output is ``(w + alpha) * score``. Same-camera probe/gallery pairs are lifted like all others.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ..ops.dtypes import accumulation_dtype

__all__ = ["tlift"]

ArrayLike = Union[np.ndarray, torch.Tensor, Any]

# Bound on the elements of the temporary candidate arrays built per chunk of probes.
_CHUNK_ELEMENTS = 1 << 22


def _tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    if torch.is_tensor(x):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(device)


def _per_sample(x: ArrayLike, name: str, n: int, device: torch.device, what: str) -> torch.Tensor:
    """A 1-D tensor of one non-boolean value per sample (``what`` names the values in errors)."""
    t = _tensor(x, name, device).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name}: expected {n} entries (one per {'probe' if 'prob' in name else 'gallery'}"
                         f" sample), got {t.numel()}")
    if t.dtype == torch.bool:
        raise ValueError(f"{name}: {what} must be numbers, got booleans")
    return t


def _camera_ids(x: ArrayLike, name: str, n: int, device: torch.device) -> torch.Tensor:
    t = _per_sample(x, name, n, device, "camera ids")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{name}: camera ids must be integers")
        t = t.round()
    return t.to(torch.int64)


def _times(x: ArrayLike, name: str, n: int, device: torch.device) -> torch.Tensor:
    t = _per_sample(x, name, n, device, "time stamps")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: time stamps must be finite")
    return t


def _windows(t_sorted: torch.Tensor, tau: float):
    """For time-sorted probes, the half-open index range [lo, hi) of those within ``tau`` of each one.

    Uses exactly the test ``|t_j - t_i| < tau``; the set is contiguous in sorted order because the
    rounded difference is monotone in ``t_j``.
    """
    n = t_sorted.numel()
    lo = torch.empty(n, dtype=torch.int64, device=t_sorted.device)
    hi = torch.empty_like(lo)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for s in range(0, n, step):
        e = min(s + step, n)
        diff = t_sorted[None, :] - t_sorted[s:e, None]  # t_j - t_i
        lo[s:e] = (diff <= -tau).sum(dim=1)
        hi[s:e] = (diff < tau).sum(dim=1)
    return lo, hi


def _pivot_weights(top_vals: torch.Tensor, top_cols: torch.Tensor, next_vals: Optional[torch.Tensor], n_g: int,
                   lo: torch.Tensor, hi: torch.Tensor, K: int, block_rows: Callable[[int, int], torch.Tensor]):
    """Pivots of every probe of one camera against one gallery camera, as a sparse matrix in COO form.

    ``top_vals``/``top_cols``: the ``min(K, n_g)`` largest scores of each probe row (time-sorted probes)
    and their gallery columns; ``next_vals``: each row's (K+1)-th largest score (None when
    ``n_g <= K``); ``[lo, hi)``: each probe's co-occurrence range; ``block_rows(a, b)``: the full score
    rows ``a..b`` (only read when a row holds a tie at the threshold past its top-K list).
    Returns ``(rows, cols, vals)`` with ``vals = 1 / (number of pivots of the row)``; repeated
    ``(row, col)`` entries stand for repeated pivots.
    """
    n_p, kc = top_vals.shape
    lens = hi - lo
    rows_out, cols_out = [], []
    fallback = []
    max_len = int(lens.max())
    step = max(1, _CHUNK_ELEMENTS // max(1, max_len * kc))
    offs = torch.arange(max_len, device=top_vals.device)
    for s in range(0, n_p, step):
        e = min(s + step, n_p)
        L = int(lens[s:e].max())
        member = lo[s:e, None] + offs[None, :L]  # [B, L] probe rows of each co-occurrence set
        valid = offs[None, :L] < lens[s:e, None]
        member = torch.where(valid, member, lo[s:e, None])
        cand = top_vals[member]  # [B, L, kc]: the top entries of every member row
        cand = torch.where(valid[..., None], cand, torch.full_like(cand, -float("inf")))
        flat = cand.reshape(e - s, L * kc)
        block_size = lens[s:e] * n_g
        if K <= L * kc:
            kth = torch.topk(flat, K, dim=1, largest=True, sorted=True).values[:, -1]
        else:
            kth = torch.full((e - s,), -float("inf"), dtype=flat.dtype, device=flat.device)
        smallest = torch.where(valid[..., None], cand, torch.full_like(cand, float("inf")))
        smallest = smallest.reshape(e - s, L * kc).amin(dim=1)
        # more than K entries in the block: the K-th largest; otherwise the smallest (whole rows are
        # candidates then, since n_g <= K)
        thr = torch.where(block_size > K, kth, smallest)
        # entries past a row's top-K list are <= its (K+1)-th, which is <= thr (thr is the K-th largest
        # of a block containing the row): only a (K+1)-th equal to thr means more pivots there; count
        # such probes from the full block instead
        if next_vals is not None:
            row_tied = torch.where(valid, next_vals[member] == thr[:, None], False).any(dim=1)
        else:
            row_tied = torch.zeros(e - s, dtype=torch.bool, device=top_vals.device)
        pick = (cand >= thr[:, None, None]) & valid[..., None] & ~row_tied[:, None, None]
        b, m, k = pick.nonzero(as_tuple=True)
        rows_out.append(b + s)
        cols_out.append(top_cols[member[b, m], k])
        for i in row_tied.nonzero(as_tuple=True)[0].tolist():
            fallback.append((s + i, float(thr[i])))
    for i, thr_i in fallback:
        sub = block_rows(int(lo[i]), int(hi[i]))
        _, c = (sub >= thr_i).nonzero(as_tuple=True)
        rows_out.append(torch.full_like(c, i))
        cols_out.append(c)
    rows = torch.cat(rows_out)
    cols = torch.cat(cols_out)
    count = torch.bincount(rows, minlength=n_p).to(torch.float64)
    vals = 1.0 / count[rows]
    return rows, cols, vals


def tlift(
    score: ArrayLike,
    gal_cam: ArrayLike,
    gal_time: ArrayLike,
    prob_cam: ArrayLike,
    prob_time: ArrayLike,
    tau: float = 100,
    sigma: float = 200,
    K: int = 10,
    alpha: float = 0.2,
) -> ArrayLike:
    """Temporal Lifting of a ``[num_probe, num_gallery]`` similarity matrix (higher = more similar).

    Camera ids are integers (any values); times are in seconds. Defaults follow the public QAConv code
    (``tau=100, sigma=200, K=10, alpha=0.2``); the paper states ``K = tau = sigma = 100, alpha = 0.1``.
    Scores should lie roughly in ``[0, 1]`` (sigmoid or ``1 - re-ranked distance``).

    Accepts numpy arrays or torch tensors (CPU or CUDA) and returns the same kind as ``score``, in its
    dtype when that is floating point (integer scores come back as float64). Weights are computed in
    float64 for float64 (and integer) scores and float32 otherwise.
    """
    is_tensor = torch.is_tensor(score)
    device = score.device if is_tensor else torch.device("cpu")
    S = _tensor(score, "score", device)
    if S.dim() != 2:
        raise ValueError(f"score: expected a 2-D [num_probe, num_gallery] matrix, got shape {tuple(S.shape)}")
    out_dtype = S.dtype
    if not S.is_floating_point():
        S = S.to(torch.float64)
    work_dtype = accumulation_dtype(S.dtype)
    S = S.to(work_dtype)
    n_prob, n_gal = S.shape
    if S.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(S))).all()):
        raise ValueError("score: all entries must be finite")
    pc = _camera_ids(prob_cam, "prob_cam", n_prob, device)
    gc = _camera_ids(gal_cam, "gal_cam", n_gal, device)
    pt = _times(prob_time, "prob_time", n_prob, device)
    gt = _times(gal_time, "gal_time", n_gal, device)
    for name, v in (("tau", tau), ("sigma", sigma), ("alpha", alpha)):
        if not np.isfinite(float(v)):
            raise ValueError(f"{name}: must be finite, got {v}")
    if float(sigma) == 0:
        raise ValueError("sigma: must be non-zero")
    if float(tau) <= 0:
        raise ValueError(f"tau: must be > 0 (the co-occurrence window |t_j - t_i| < tau), got {tau}")
    if int(K) != K or K < 1:
        raise ValueError(f"K: must be a positive integer, got {K}")
    K = int(K)
    tau = float(tau)
    inv_s2 = 1.0 / (float(sigma) ** 2)
    cutoff = 87.0 if work_dtype == torch.float32 else 708.0

    out = torch.empty_like(S)
    if S.numel() == 0:
        return out if is_tensor else out.cpu().numpy()
    probe_groups = []
    for c in torch.unique(pc).tolist():
        pidx = (pc == c).nonzero(as_tuple=True)[0]
        pidx = pidx[torch.argsort(pt[pidx], stable=True)]
        probe_groups.append((pidx, *_windows(pt[pidx], tau)))
    gal_groups = [(gc == g).nonzero(as_tuple=True)[0] for g in torch.unique(gc).tolist()]
    max_ng = max((gidx.numel() for gidx in gal_groups), default=0)
    # scratch reused for every gallery camera (saves page faults on fresh allocations)
    block_buf = torch.empty(n_prob * max_ng, dtype=work_dtype, device=device)
    weight_buf = torch.empty_like(block_buf)
    for gidx in gal_groups:
        g_time = gt[gidx]
        n_g = gidx.numel()
        cols_index = gidx.expand(n_prob, n_g)
        block = torch.gather(S, 1, cols_index, out=block_buf[: n_prob * n_g].view(n_prob, n_g))
        top_vals, top_cols = torch.topk(block, min(K + 1, n_g), dim=1, largest=True, sorted=True)
        next_vals = top_vals[:, K] if n_g > K else None
        top_vals, top_cols = top_vals[:, :K], top_cols[:, :K]
        rows_all, cols_all, vals_all = [], [], []
        for pidx, lo, hi in probe_groups:
            rows, cols, vals = _pivot_weights(top_vals[pidx], top_cols[pidx],
                                              None if next_vals is None else next_vals[pidx], n_g, lo, hi, K,
                                              lambda a, b, p=pidx: block[p[a:b]])
            rows_all.append(pidx[rows])
            cols_all.append(cols)
            vals_all.append(vals)
        # weight = C @ E with E[y, x] = exp(-(t_y - t_x)^2 / sigma^2), built only for the pivot columns used
        used, col_in_used = torch.unique(torch.cat(cols_all), return_inverse=True)
        C = torch.sparse_coo_tensor(torch.stack([torch.cat(rows_all), col_in_used]),
                                    torch.cat(vals_all).to(work_dtype), (n_prob, used.numel()),
                                    check_invariants=False).coalesce()
        weight = weight_buf[: n_prob * n_g].view(n_prob, n_g)
        pivot_time = g_time[used]
        step = max(1, _CHUNK_ELEMENTS * 4 // used.numel())
        for x0 in range(0, n_g, step):
            x1 = min(x0 + step, n_g)
            dt = pivot_time[:, None] - g_time[None, x0:x1]
            arg = dt.square_().mul_(inv_s2).to(work_dtype)
            del dt
            # exp(-arg) below the smallest normal number is flushed to 0 (avoids slow subnormal paths)
            far = arg >= cutoff
            E = torch.exp(arg.clamp_(max=cutoff).neg_()).masked_fill_(far, 0.0)
            del arg, far
            if x0 == 0 and x1 == n_g:
                torch.mm(C, E, out=weight)
            else:
                weight[:, x0:x1] = torch.sparse.mm(C, E)
            del E
        del C
        out.scatter_(1, cols_index, weight.add_(alpha).mul_(block))
    del block_buf, weight_buf
    out = out.to(out_dtype) if out_dtype.is_floating_point else out
    if is_tensor:
        return out
    return out.cpu().numpy()
