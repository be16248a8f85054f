"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the conventions of the QAConv evaluation.

The combined distance matrix over query + gallery (``N = P + G`` items) is

    D = [[dist_qq, dist_qg], [dist_qg^T, dist_gg]]

used as given (distances are **not** squared; they must be finite and non-negative). Each column of ``D`` is divided by its maximum and the
result transposed, so row ``i`` of the "original distance" ``O`` is ``O[i, j] = D[j, i] / max_k D[k, i]``.
From ``O``: k-reciprocal neighbour sets with ``k1`` (expanded with the ``round(k1 / 2)`` sets of their
members when those overlap by more than 2/3), Gaussian-like weights ``exp(-O)`` normalised per row into
``V``, local query expansion (each row of ``V`` replaced by the mean of the rows of its ``k2`` nearest
items, skipped when ``k2 == 1``), the Jaccard distance ``1 - s / (2 - s)`` with
``s = sum_k min(V[q, k], V[g, k])``, and finally
``(1 - lambda_value) * jaccard + lambda_value * O[q, g]`` for the query-gallery block.

Two ways to run it:

* ``mode="dense"`` materialises ``O`` (``4 N^2`` bytes: 1.5 GB for Market-1501, 35 GB for MSMT17).
* ``mode="sparse"`` never holds more than a row block of ``dist_gg``: it streams ``dist_gg`` (an array,
  e.g. a ``numpy.memmap``, or a callable ``dist_gg(start, stop) -> rows [stop - start, G]``) once,
  keeping a running top-k list and the maximum of every column, then works on the sparse ``V`` only.
  Memory is ``O(P * G + N * k)``. When a neighbour's neighbour lies outside an item's kept list, its
  distance is read back from ``dist_gg`` (for a callable: one more call per row block that holds such
  rows, asking only for the span of rows needed; or, when the callable has a method
  ``entries(rows, cols) -> dist_gg[rows, cols]``, just those entries).

Both modes give the same result up to float32 rounding; they may differ where distances tie exactly at
a neighbour-list boundary (ties are broken by whatever order ``torch.topk`` returns). Computations use
float32 (the public QAConv code stores ``V`` in float16).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Union

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..utils.matrix_checks import check_matrix

__all__ = ["k_reciprocal_rerank"]

ArrayLike = Union[np.ndarray, torch.Tensor, Any]
RowBlocks = Callable[[int, int], ArrayLike]

# Elements of one temporary block (rows x columns) in the blocked passes: 2^24 float32 = 64 MB.
_BLOCK_ELEMENTS = 1 << 24
# Extra neighbours kept per item in sparse mode, beyond max(k1 + 1, k2), so that the distances needed by
# the expansion step are usually found in the kept lists.
_EXTRA_NEIGHBOURS = 1.0


def _as_float32(x: ArrayLike, name: str) -> torch.Tensor:
    if torch.is_tensor(x):
        t = x.detach().to("cpu")
    else:
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(arr) if arr.dtype == np.float32 else torch.from_numpy(arr.astype(np.float32))
    if t.dtype != torch.float32:
        t = t.float()
    return t


def _check_shape(t: torch.Tensor, name: str, shape: Tuple[int, int]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


#: What the checks say a valid input is.
VALID_DISTANCE = ("re-ranking needs finite distances >= 0, lower = more similar: from similarity scores use "
                  "1 - sigmoid(score / 10) (qaconv_ext.evaluation.score_to_distance) or score.max() - score "
                  "(one maximum for all three matrices), not -score")


def _check_distances(t: torch.Tensor, name: str, row_offset: int = 0, total_rows: Optional[int] = None) -> None:
    """Finite and non-negative, or a one-line ``ValueError`` saying how many entries are not and where
    the first is (rows numbered in the whole matrix when ``t`` is a row block of it)."""
    partial = total_rows is not None and (row_offset != 0 or t.shape[0] != total_rows)
    scope = f" in rows {row_offset}:{row_offset + t.shape[0]}" if partial else ""
    check_matrix(t, name, row_offset=row_offset, scope=scope, non_negative=VALID_DISTANCE)


def _check_max(m: torch.Tensor) -> None:
    if bool((m == 0).any()):
        i = int((m == 0).nonzero()[0, 0])
        raise ValueError(f"column {i} of the combined distance matrix has maximum 0 (every distance to item {i} "
                         "is 0), so the column-max normalisation is undefined")


class _GalleryRows:
    """Row blocks of ``dist_gg`` from an array or a callable, as float32 CPU tensors."""

    def __init__(self, dist_gg: Union[ArrayLike, RowBlocks], G: int):
        self.G = G
        self.func = dist_gg if callable(dist_gg) else None
        if self.func is None:
            self.array = dist_gg if isinstance(dist_gg, np.ndarray) else _as_float32(dist_gg, "dist_gg")
            if tuple(self.array.shape) != (G, G):
                raise ValueError(f"dist_gg: expected shape {(G, G)}, got {tuple(self.array.shape)}")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        blk = self.func(start, stop) if self.func is not None else self.array[start:stop]
        t = _as_float32(blk, "dist_gg")
        if tuple(t.shape) != (stop - start, self.G):
            raise ValueError(f"dist_gg: rows {start}:{stop} should have shape {(stop - start, self.G)}, "
                             f"got {tuple(t.shape)}")
        _check_distances(t, "dist_gg", start, self.G)
        return t

    def gather(self, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Entries ``dist_gg[r, c]`` (float32); ``r`` sorted ascending when ``dist_gg`` is a callable."""
        if self.func is None:
            if isinstance(self.array, np.ndarray):
                return np.asarray(self.array[r, c], dtype=np.float32)
            return self.array[torch.from_numpy(r), torch.from_numpy(c)].numpy()
        entries = getattr(self.func, "entries", None)
        if entries is not None:  # the callable computes single entries: no whole rows are needed
            return _as_float32(entries(r, c), "dist_gg").numpy().reshape(-1)
        out = np.empty(r.shape[0], dtype=np.float32)
        block = max(1, _BLOCK_ELEMENTS // max(self.G, 1))
        starts = (r // block) * block
        for s in np.unique(starts).tolist():
            sel = np.flatnonzero(starts == s)
            lo, hi = int(r[sel].min()), int(r[sel].max()) + 1  # only the rows needed
            blk = self.rows(lo, hi).numpy()
            out[sel] = blk[r[sel] - lo, c[sel]]
        return out


def _reciprocal(knn: torch.Tensor, k: int, progress: bool, desc: str) -> torch.Tensor:
    """Mask ``[N, k']`` over ``knn[:, :k']`` (``k' = min(k + 1, M)``): neighbour ``f`` of ``i`` is kept when
    ``i`` is also among the first ``k'`` neighbours of ``f``."""
    N = knn.shape[0]
    kk = min(k + 1, knn.shape[1])
    head = knn[:, :kk].contiguous()
    out = torch.empty(N, kk, dtype=torch.bool)
    step = max(1, _BLOCK_ELEMENTS // (4 * kk * kk))
    for s in tqdm(range(0, N, step), desc=desc, disable=not progress, leave=False):
        e = min(s + step, N)
        back = head[head[s:e]]  # [B, kk, kk]
        me = torch.arange(s, e)[:, None, None]
        out[s:e] = (back == me).any(dim=2)
    return out


def _build_v(knn: torch.Tensor, knn_vals: torch.Tensor, k1: int,
             lookup: Callable[[np.ndarray, np.ndarray], np.ndarray], progress: bool) -> sp.csr_matrix:
    """The k-reciprocal feature matrix ``V`` ([N, N], CSR, float32) before query expansion."""
    N, M = knn.shape
    kh = int(np.around(k1 / 2.0))
    mask1 = _reciprocal(knn, k1, progress, "k-reciprocal sets")
    maskh = _reciprocal(knn, kh, progress, "k/2-reciprocal sets")
    a, h = mask1.shape[1], maskh.shape[1]
    head_h = knn[:, :h].contiguous()
    E = a + a * h  # upper bound on the expanded set size
    step = max(1, _BLOCK_ELEMENTS // (8 * E))
    rows_l: List[np.ndarray] = []
    cols_l: List[np.ndarray] = []
    vals_l: List[np.ndarray] = []
    miss_rows: List[np.ndarray] = []
    miss_cols: List[np.ndarray] = []
    miss_at: List[np.ndarray] = []
    offset = 0
    sentinel = torch.full((), N, dtype=knn.dtype)
    for s in tqdm(range(0, N, step), desc="expansion", disable=not progress, leave=False):
        e = min(s + step, N)
        B = e - s
        cand = knn[s:e, :a]  # [B, a]
        m1 = mask1[s:e]
        H = head_h[cand]  # [B, a, h]: the first h neighbours of each candidate
        Hm = maskh[cand]  # which of them are in the candidate's round(k1/2)-reciprocal set
        # membership of H in the k-reciprocal set of the row, by binary search in the sorted set
        rset = torch.sort(torch.where(m1, cand, sentinel), dim=1).values
        hit = torch.searchsorted(rset, H.reshape(B, a * h)).clamp_(max=a - 1)
        in_r = (torch.gather(rset, 1, hit) == H.reshape(B, a * h)).view(B, a, h)
        inter = (in_r & Hm).sum(dim=2).double()
        size = Hm.sum(dim=2).double()
        accept = m1 & (inter > size * (2.0 / 3.0))
        members = torch.cat([torch.where(m1, cand, sentinel),
                             torch.where(accept[..., None] & Hm, H, sentinel).reshape(B, a * h)], dim=1)
        members, _ = torch.sort(members, dim=1)
        keep = members != sentinel
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]
        # distances O[i, j]: from the kept neighbour list when present (binary search), else looked up
        ids, perm = torch.sort(knn[s:e], dim=1)
        at = torch.searchsorted(ids, members).clamp_(max=M - 1)
        found = torch.gather(ids, 1, at) == members
        vals = torch.gather(knn_vals[s:e], 1, torch.gather(perm, 1, at))
        r, c = keep.nonzero(as_tuple=True)
        v = vals[r, c].double().numpy()
        f = found[r, c].numpy()
        rr = (r + s).numpy()
        cc = members[r, c].numpy()
        if not f.all():
            miss = np.flatnonzero(~f)
            miss_rows.append(rr[miss])
            miss_cols.append(cc[miss])
            miss_at.append(miss + offset)
        rows_l.append(rr)
        cols_l.append(cc)
        vals_l.append(v)
        offset += rr.shape[0]
    rows = np.concatenate(rows_l) if rows_l else np.zeros(0, np.int64)
    cols = np.concatenate(cols_l) if cols_l else np.zeros(0, np.int64)
    dist = np.concatenate(vals_l) if vals_l else np.zeros(0)
    if miss_rows:
        at = np.concatenate(miss_at)
        dist[at] = lookup(np.concatenate(miss_rows), np.concatenate(miss_cols))
    w = np.exp(-dist)
    counts = np.bincount(rows, minlength=N)
    sums = np.bincount(rows, weights=w, minlength=N)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = (w / sums[rows]).astype(np.float32)
    indptr = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return sp.csr_matrix((w, cols.astype(np.int64), indptr), shape=(N, N))


def _query_expansion(V: sp.csr_matrix, knn: torch.Tensor, k2: int) -> sp.csr_matrix:
    if k2 == 1:
        return V
    N = V.shape[0]
    kk = min(k2, knn.shape[1])
    cols = knn[:, :kk].reshape(-1).numpy()
    A = sp.csr_matrix((np.full(N * kk, 1.0 / kk, dtype=np.float32), cols,
                       np.arange(0, N * kk + 1, kk)), shape=(N, N))
    out = (A @ V).tocsr()
    out.eliminate_zeros()
    return out


def _jaccard_rows(V: sp.csr_matrix, P: int, progress: bool) -> Callable[[int, int], torch.Tensor]:
    """Returns ``rows(s, e)``: the ``[e - s, G]`` sums ``sum_k min(V[q, k], V[P + g, k])`` for queries
    ``s..e``, computed through the inverted index (columns of the gallery part of ``V``)."""
    N = V.shape[0]
    G = N - P
    inv = V[P:].tocsc()
    inv.sort_indices()
    inv_ptr = torch.from_numpy(inv.indptr.astype(np.int64))
    inv_rows = torch.from_numpy(inv.indices.astype(np.int64))
    inv_vals = torch.from_numpy(inv.data.astype(np.float32))
    Vq = V[:P].tocsr()
    q_ptr = torch.from_numpy(Vq.indptr.astype(np.int64))
    q_cols = torch.from_numpy(Vq.indices.astype(np.int64))
    q_vals = torch.from_numpy(Vq.data.astype(np.float32))

    def rows(s: int, e: int) -> torch.Tensor:
        out = torch.zeros((e - s) * G, dtype=torch.float32)
        lo, hi = int(q_ptr[s]), int(q_ptr[e])
        if hi == lo:
            return out.view(e - s, G)
        k = q_cols[lo:hi]
        a = q_vals[lo:hi]
        r = torch.repeat_interleave(torch.arange(e - s), q_ptr[s + 1:e + 1] - q_ptr[s:e])
        start = inv_ptr[k]
        cnt = inv_ptr[k + 1] - start
        total = int(cnt.sum())
        if total == 0:
            return out.view(e - s, G)
        first = torch.cumsum(cnt, 0) - cnt
        pos = torch.arange(total) + torch.repeat_interleave(start - first, cnt, output_size=total)
        dest = torch.repeat_interleave(r * G, cnt, output_size=total) + inv_rows[pos]
        v = torch.minimum(torch.repeat_interleave(a, cnt, output_size=total), inv_vals[pos])
        out.index_add_(0, dest, v)
        return out.view(e - s, G)

    # rows per block: bounded by the dense output and by the number of expanded entries
    inv_cnt = np.diff(inv.indptr)
    acc = np.concatenate([[0], np.cumsum(inv_cnt[Vq.indices], dtype=np.int64)])
    rows.work = acc[Vq.indptr[1:]] - acc[Vq.indptr[:-1]]  # type: ignore[attr-defined]
    return rows


def _query_blocks(work: np.ndarray, G: int) -> List[Tuple[int, int]]:
    P = work.shape[0]
    max_rows = max(1, _BLOCK_ELEMENTS // (4 * max(G, 1)))
    max_work = _BLOCK_ELEMENTS
    blocks = []
    s = 0
    while s < P:
        e = s + 1
        acc = int(work[s])
        while e < P and e - s < max_rows and acc + int(work[e]) <= max_work:
            acc += int(work[e])
            e += 1
        blocks.append((s, e))
        s = e
    return blocks


def _finish(V: sp.csr_matrix, knn: torch.Tensor, k2: int, P: int, lambda_value: float,
            original_qg: Callable[[int, int], torch.Tensor], progress: bool) -> np.ndarray:
    """Query expansion, Jaccard distance and the final blend, for the query rows only."""
    N = V.shape[0]
    G = N - P
    V = _query_expansion(V, knn, k2)
    rows = _jaccard_rows(V, P, progress)
    final = np.empty((P, G), dtype=np.float32)
    out = torch.from_numpy(final)
    blocks = _query_blocks(rows.work, G)  # type: ignore[attr-defined]
    for s, e in tqdm(blocks, desc="jaccard", disable=not progress, leave=False):
        t = rows(s, e)
        jac = 1.0 - t / (2.0 - t)
        out[s:e] = jac * (1.0 - lambda_value) + original_qg(s, e) * lambda_value
    return final


def _topk_rows(O_rows: torch.Tensor, M: int) -> Tuple[torch.Tensor, torch.Tensor]:
    v, i = torch.topk(O_rows, M, dim=1, largest=False, sorted=True)
    return i, v


def _available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _dense(qg: torch.Tensor, qq: torch.Tensor, gg: _GalleryRows, k1: int, k2: int, lambda_value: float,
           M: int, progress: bool) -> np.ndarray:
    P, G = qg.shape
    N = P + G
    need = 4 * N * N
    avail = _available_memory()
    if avail is not None and need > avail:
        raise MemoryError(f"mode='dense' needs {need / 2 ** 30:.1f} GiB for the {N} x {N} distance matrix but "
                          f"only {avail / 2 ** 30:.1f} GiB is available; use mode='sparse'")
    # O^T before normalisation: row i holds column i of D
    O = torch.empty(N, N, dtype=torch.float32)
    O[:P, :P] = qq.t()
    O[:P, P:] = qg
    O[P:, :P] = qg.t()
    step = max(1, _BLOCK_ELEMENTS // max(G, 1))
    for s in tqdm(range(0, G, step), desc="dist_gg", disable=not progress, leave=False):
        e = min(s + step, G)
        O[P:, P + s:P + e] = gg.rows(s, e).t()
    m = O.amax(dim=1)
    _check_max(m)
    O.div_(m[:, None])
    knn = torch.empty(N, M, dtype=torch.int64)
    knn_vals = torch.empty(N, M, dtype=torch.float32)
    step = max(1, _BLOCK_ELEMENTS // N)
    for s in tqdm(range(0, N, step), desc="neighbours", disable=not progress, leave=False):
        e = min(s + step, N)
        knn[s:e], knn_vals[s:e] = _topk_rows(O[s:e], M)

    def lookup(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return O[torch.from_numpy(r), torch.from_numpy(c)].numpy()

    V = _build_v(knn, knn_vals, k1, lookup, progress)
    return _finish(V, knn, k2, P, lambda_value, lambda s, e: O[s:e, P:], progress)


def _merge_block(run_v: torch.Tensor, run_i: torch.Tensor, blk: torch.Tensor, first_row: int, keep: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge the rows of ``blk`` (items ``first_row, first_row + 1, ...``) into running per-column lists
    of the ``keep`` smallest values, sorted. Once a list is full, only block entries that
    beat its current last value take part, which keeps the merge cheap after the first blocks."""
    n, G = run_v.shape
    B = blk.shape[0]
    if n == keep:
        thr = run_v[-1]
        mask = blk < thr
        r, c = mask.nonzero(as_tuple=True)
        del mask
        if r.numel() == 0:
            return run_v, run_i
        cnt = torch.bincount(c, minlength=G)
        width = int(cnt.max())
        if width < B // 2:
            order = torch.argsort(c, stable=True)  # group by column
            r, c = r[order], c[order]
            first = torch.cumsum(cnt, 0) - cnt
            slot = torch.arange(r.numel()) - first[c]
            cand_v = torch.full((width, G), float("inf"), dtype=blk.dtype)
            cand_i = torch.zeros((width, G), dtype=run_i.dtype)
            cand_v[slot, c] = blk[r, c]
            cand_i[slot, c] = r + first_row
            vals, pos = torch.topk(torch.cat([run_v, cand_v], dim=0), keep, dim=0, largest=False, sorted=True)
            return vals, torch.gather(torch.cat([run_i, cand_i], dim=0), 0, pos)
    kk = min(keep, n + B)
    if n == 0:
        vals, pos = torch.topk(blk, kk, dim=0, largest=False, sorted=True)
        return vals, pos + first_row
    vals, pos = torch.topk(torch.cat([run_v, blk], dim=0), kk, dim=0, largest=False, sorted=True)
    from_run = torch.gather(run_i, 0, pos.clamp(max=n - 1))
    return vals, torch.where(pos < n, from_run, pos - n + first_row)


def _sparse(qg: torch.Tensor, qq: torch.Tensor, gg: _GalleryRows, k1: int, k2: int, lambda_value: float,
            M: int, progress: bool) -> np.ndarray:
    P, G = qg.shape
    N = P + G
    keep = min(N, M + int(np.ceil(_EXTRA_NEIGHBOURS * M)))
    knn = torch.empty(N, keep, dtype=torch.int64)
    knn_vals = torch.empty(N, keep, dtype=torch.float32)
    m = torch.empty(N, dtype=torch.float32)

    # query rows of O: [dist_qq[:, i], dist_qg[i, :]] / max
    step = max(1, _BLOCK_ELEMENTS // N)
    for s in tqdm(range(0, P, step), desc="query neighbours", disable=not progress, leave=False):
        e = min(s + step, P)
        R = torch.cat([qq[:, s:e].t(), qg[s:e]], dim=1)
        mx = R.amax(dim=1)
        _check_max(mx)
        m[s:e] = mx
        knn[s:e], knn_vals[s:e] = _topk_rows(R.div_(mx[:, None]), keep)

    # gallery rows of O: [dist_qg[:, g], dist_gg[:, g]] / max, streamed over row blocks of dist_gg
    # distances are >= 0 and every column maximum > 0 (checked), so dividing by the maximum keeps the
    # order: the running lists are collected on raw distances
    col_max = qg.amax(dim=0)
    run_v = torch.empty(0, G, dtype=torch.float32)
    run_i = torch.empty(0, G, dtype=torch.int64)
    step = max(1, _BLOCK_ELEMENTS // max(G, 1))
    blocks = [(False, s, min(s + step, P)) for s in range(0, P, step)]
    blocks += [(True, s, min(s + step, G)) for s in range(0, G, step)]
    for from_gg, s, e in tqdm(blocks, desc="dist_gg", disable=not progress, leave=False):
        if from_gg:
            blk = gg.rows(s, e)
            col_max = torch.maximum(col_max, blk.amax(dim=0))
            first = P + s
        else:
            blk = qg[s:e]
            first = s
        run_v, run_i = _merge_block(run_v, run_i, blk, first, keep)
        del blk
    _check_max(col_max)
    m[P:] = col_max
    knn[P:] = run_i.t()
    knn_vals[P:] = run_v.t() / col_max[:, None]
    del run_v, run_i

    qg_np = qg.numpy()
    qq_np = qq.numpy()
    m_np = m.numpy()

    def lookup(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        """O[r, c] = D[c, r] / m[r] for arbitrary pairs."""
        out = np.empty(r.shape[0], dtype=np.float32)
        qr, qc = r < P, c < P
        sel = qr & qc
        out[sel] = qq_np[c[sel], r[sel]]
        sel = qr & ~qc
        out[sel] = qg_np[r[sel], c[sel] - P]
        sel = ~qr & qc
        out[sel] = qg_np[c[sel], r[sel] - P]
        sel = np.flatnonzero(~qr & ~qc)
        if sel.size:
            order = np.argsort(c[sel], kind="stable")  # grouped by dist_gg row
            sel = sel[order]
            out[sel] = gg.gather(c[sel] - P, r[sel] - P)
        return out / m_np[r]

    V = _build_v(knn[:, :keep], knn_vals, k1, lookup, progress)
    knn = knn[:, :M]
    return _finish(V, knn, k2, P, lambda_value, lambda s, e: qg[s:e] / m[s:e, None], progress)


def k_reciprocal_rerank(
    dist_qg: ArrayLike,
    dist_qq: ArrayLike,
    dist_gg: Union[ArrayLike, RowBlocks],
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    mode: str = "dense",
    progress: Optional[bool] = None,
) -> np.ndarray:
    """k-reciprocal re-ranking of a query-gallery distance matrix (lower = more similar).

    Distances must be finite and non-negative: each column is divided by its maximum, which turns the
    order of a column of negated scores around. Convert similarity scores first, e.g.
    ``1 - sigmoid(score / 10)`` (:func:`qaconv_ext.evaluation.score_to_distance`) or ``score.max() - score``
    with one maximum for all three matrices. A negative, NaN or infinite entry raises ``ValueError``
    (how many, and where the first is).

    Args:
        dist_qg: ``[P, G]`` query-gallery distances (numpy or torch).
        dist_qq: ``[P, P]`` query-query distances.
        dist_gg: ``[G, G]`` gallery-gallery distances, or a callable ``dist_gg(start, stop)`` returning the
            rows ``start..stop`` as a ``[stop - start, G]`` array (numpy or torch); optionally with a method
            ``dist_gg.entries(rows, cols)`` returning the single entries ``dist_gg[rows[i], cols[i]]``.
        k1, k2, lambda_value: the method's parameters (paper defaults 20, 6, 0.3).
        mode: ``"dense"`` (materialises the ``(P + G)^2`` matrix) or ``"sparse"`` (memory-bounded).
        progress: show progress bars; default: only for problems with more than 20,000 items.

    Returns:
        ``[P, G]`` float32 numpy array of re-ranked distances.
    """
    if mode not in ("dense", "sparse"):
        raise ValueError(f"mode: expected 'dense' or 'sparse', got {mode!r}")
    for name, v in (("k1", k1), ("k2", k2)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name}: must be a positive integer, got {v}")
    k1, k2 = int(k1), int(k2)
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value: must lie in [0, 1], got {lambda_value}")
    qg = _as_float32(dist_qg, "dist_qg")
    if qg.dim() != 2:
        raise ValueError(f"dist_qg: expected a 2-D [P, G] matrix, got shape {tuple(qg.shape)}")
    P, G = qg.shape
    qq = _as_float32(dist_qq, "dist_qq")
    _check_shape(qq, "dist_qq", (P, P))
    _check_distances(qg, "dist_qg")
    _check_distances(qq, "dist_qq")
    gg = _GalleryRows(dist_gg, G)
    if P == 0 or G == 0:
        return np.zeros((P, G), dtype=np.float32)
    N = P + G
    M = min(N, max(k1 + 1, k2))
    if progress is None:
        progress = N > 20000
    run = _dense if mode == "dense" else _sparse
    return run(qg.contiguous(), qq.contiguous(), gg, k1, k2, float(lambda_value), M, bool(progress))
