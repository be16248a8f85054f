"""Search a camera archive: a gallery index on disk, exact streaming top-k, and a two-stage search.

* :class:`GalleryIndex` — feature maps (float16, memory-mappable), records and the model's identity
  in a folder; built from images or maps, appended to without rewriting, opened with checks.
* :func:`streaming_topk` — exact top-k QAConv scores over any chunked source of gallery maps, through
  the fused :func:`qaconv_ext.qaconv_score`, in ``O(P * k + chunk)`` memory.
* ``GalleryIndex.search(..., shortlist=M)`` — shortlist by a global descriptor, re-rank exactly.
* ``GalleryIndex.search(..., shortlist=M, method="centroid")`` — shortlist by the centroid-coded maps
  (:mod:`.centroids`, stored by :mod:`.codes`), re-rank exactly.
"""
from .identity import checkpoint_sha256, model_identity
from .centroids import centroid_topk, spherical_kmeans
from .index import DEFAULT_CHUNK_BYTES, METHODS, GalleryIndex, NonFiniteScoresError
from .storage import FORMAT, GalleryIndexError
from .topk import descriptor_topk, global_descriptors, merge_topk, rerank_shortlist, select_topk, streaming_topk

__all__ = [
    "GalleryIndex", "GalleryIndexError", "NonFiniteScoresError", "streaming_topk", "select_topk", "merge_topk", "global_descriptors",
    "descriptor_topk", "rerank_shortlist", "checkpoint_sha256", "model_identity", "FORMAT", "DEFAULT_CHUNK_BYTES",
    "METHODS", "centroid_topk", "spherical_kmeans",
]
