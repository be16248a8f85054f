"""Centroid codes of feature maps: a spherical k-means codebook over location vectors, the uint16 codes of
every map, and the candidate stage of the centroid two-stage search.

QAConv's location vectors are L2-normalised along the channels, so the codebook is trained by spherical
k-means (assignment by the largest dot product, centroids the normalised means of their members) and the
quantisation error of a vector is ``1 - <x, C[c(x)]>`` (one minus its cosine with its centroid). Training
is seeded and deterministic for a given machine and thread count (float32 GEMMs; ties go to the smaller id).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

from .topk import merge_topk

__all__ = [
    "CENTROID_TABLES", "CODES_DTYPE", "MAX_CENTROIDS", "RETRAIN_RATIO", "default_codebook_size", "default_sample_size",
    "location_vectors", "assign", "encode_maps", "spherical_kmeans", "centroid_topk",
]

Tensor = torch.Tensor
MapsLike = Union[Tensor, np.ndarray]

#: The query tables the candidate stage can look up: quantised (the default) or float.
CENTROID_TABLES = ("uint8", "float32")
#: Stored codes: one little-endian uint16 centroid id per map location.
CODES_DTYPE = np.dtype("<u2")
#: The largest codebook uint16 ids can address.
MAX_CENTROIDS = 1 << 16
#: Appended maps whose mean quantisation error exceeds the training sample's by this factor make a retrain
#: of the codebook worthwhile (the codebook no longer fits the data it codes).
RETRAIN_RATIO = 1.25
_ASSIGN_BYTES = 64 << 20  # float32 similarities per assignment block


def default_codebook_size(vectors: int) -> int:
    """K for ``vectors`` location vectors: the power of two nearest ``4 * sqrt(vectors)``, within 2^8..2^12
    and at most ``vectors``. 2^12 keeps a query's uint8 table (``K * Lq`` bytes: 512 KiB for 16 x 8 maps) in a
    core's L2, and was the better trade on 10^5 maps (benchmarks/bench_centroid.py): 2^14 kept 99.7 % of the
    exact top 10 at a 0.1 % shortlist against 99.4 %, for six times the training and a slower first stage."""
    n = max(1, int(vectors))
    k = min(1 << 12, max(1 << 8, 1 << int(round(math.log2(4.0 * math.sqrt(n))))))
    return min(k, 1 << int(math.floor(math.log2(n))))


def default_sample_size(k: int) -> int:
    """Location vectors k-means trains on by default: 32 per centroid, at least 2^16."""
    return max(1 << 16, 32 * int(k))


def location_vectors(maps: MapsLike) -> Tensor:
    """Feature maps ``[n, d, h, w]`` -> their location vectors ``[n * h * w, d]`` (float32; map-major, then
    locations in C order, as the codes store them)."""
    t = torch.from_numpy(np.ascontiguousarray(maps)) if isinstance(maps, np.ndarray) else maps.detach()
    t = t.to("cpu", torch.float32)
    return t.flatten(2).transpose(1, 2).reshape(-1, t.shape[1])


def assign(vectors: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """The nearest centroid of each vector by dot product: ``(ids int64 [n], similarities float32 [n])``;
    ties go to the smaller id. Blocks of rows keep the similarity matrix at 64 MiB."""
    c = centroids.to(torch.float32)
    n = vectors.shape[0]
    ids = torch.empty(n, dtype=torch.int64)
    sims = torch.empty(n, dtype=torch.float32)
    rows = max(1, _ASSIGN_BYTES // (4 * c.shape[0]))
    for s in range(0, n, rows):
        v, i = torch.max(vectors[s:s + rows].to(torch.float32) @ c.t(), dim=1)
        ids[s:s + rows], sims[s:s + rows] = i, v
    return ids, sims


def encode_maps(maps: MapsLike, centroids: Tensor) -> Tuple[np.ndarray, float]:
    """Codes of feature maps ``[n, d, h, w]``: ``(uint16 [n, h * w], summed quantisation error)``."""
    n = maps.shape[0]
    ids, sims = assign(location_vectors(maps), centroids)
    codes = ids.numpy().astype(CODES_DTYPE).reshape(n, -1)
    return codes, float((1.0 - sims.double()).sum())


def spherical_kmeans(vectors: Tensor, k: int, *, iterations: int = 10, seed: int = 0,
                     progress: Optional[Callable[[int, float], None]] = None) -> Tuple[Tensor, float]:
    """Spherical k-means of ``vectors`` ``[n, d]`` into ``k`` unit centroids.

    Starts from ``k`` distinct vectors drawn with ``seed``; each iteration assigns every vector to its most
    similar centroid and replaces each centroid by the normalised sum of its members; a centroid left without
    members takes the vector quantised worst (the least similar to its own centroid). ``progress(iteration,
    error)`` is called after each iteration. Returns ``(centroids float32 [k, d], mean quantisation error of
    the vectors with the final centroids)``.
    """
    x = F.normalize(vectors.to(torch.float32), dim=1)
    n, d = x.shape
    if not 1 <= int(k) <= n:
        raise ValueError(f"k-means: k={k} needs between 1 and the number of vectors ({n})")
    if int(k) > MAX_CENTROIDS:
        raise ValueError(f"k-means: k={k} exceeds the {MAX_CENTROIDS} centroids uint16 codes can address")
    k = int(k)
    gen = torch.Generator().manual_seed(int(seed))
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()
    for it in range(max(0, int(iterations))):
        ids, sims = assign(x, centroids)
        sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, ids, x.double())
        counts = torch.bincount(ids, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            worst = torch.sort(sims, stable=True).indices[:empty.numel()]
            sums[empty] = x[worst].double()
        centroids = F.normalize(sums, dim=1).to(torch.float32)
        if progress is not None:
            progress(it + 1, float((1.0 - sims.double()).mean()))
    _, sims = assign(x, centroids)
    return centroids, float((1.0 - sims.double()).mean())


def centroid_topk(query_maps: Tensor, code_chunks: Iterable[np.ndarray], centroids: Tensor, weight: Tensor,
                  bias: Union[Tensor, float, None], m: int, *, table: str = "uint8") -> Tuple[Tensor, Tensor]:
    """The ``m`` best coded gallery maps of every query by the centroid score
    (:func:`qaconv_ext.ops.centroid_score`), over codes streamed in consecutive chunks ``[n_i, Lg]``
    (uint16). ``table``: ``"uint8"`` (each query's table quantised to 256 levels: a quarter of the bytes,
    about 3.5x faster) or ``"float32"``. Returns ``(approximate scores [P, m'], indices [P, m'])``,
    ``m' = min(m, gallery size)``, ordered as :func:`~qaconv_ext.search.streaming_topk` orders."""
    from ..ops import centroid_score, centroid_table, quantize_centroid_table

    if table not in CENTROID_TABLES:
        raise ValueError(f"centroid_topk: table must be one of {', '.join(CENTROID_TABLES)}, got {table!r}")
    t = centroid_table(centroids, query_maps)
    lookup = quantize_centroid_table(t) if table == "uint8" else t
    w = torch.as_tensor(weight).detach().reshape(-1).to(torch.float32)
    b = torch.as_tensor(0.0 if bias is None else bias).detach().reshape(()).to(torch.float32)
    P = t.shape[0]
    run_v = torch.empty(P, 0, dtype=torch.float32)
    run_i = torch.empty(P, 0, dtype=torch.int64)
    offset = 0
    for chunk in code_chunks:
        n = chunk.shape[0]
        if n == 0:
            continue
        codes = torch.from_numpy(np.ascontiguousarray(chunk, dtype=CODES_DTYPE).view(np.uint16))
        s = centroid_score(lookup, codes, w, b)
        run_v, run_i = merge_topk(run_v, run_i, s, torch.arange(offset, offset + n).expand(P, n), m)
        offset += n
    return run_v, run_i
