"""The evaluation protocol's rule for gallery entries a query ignores (Market-1501, also used for
DukeMTMC-reID and MSMT17)."""
from __future__ import annotations

from typing import Any, Dict, Sequence

__all__ = ["junk_mask", "query_counts"]


def junk_mask(query_pids: Any, query_camids: Any, gallery_pids: Any, gallery_camids: Any) -> Any:
    """True where a gallery entry shows the query's identity in the query's camera: such entries are
    neither a match nor a mistake, and ranking leaves them out.

    Elementwise with broadcasting, on numpy arrays or torch tensors alike: one query's ``pid`` and
    ``camid`` against gallery vectors ``[N]``, or a block of queries ``[B, 1]`` against ``[B, N]``.
    """
    return (gallery_pids == query_pids) & (gallery_camids == query_camids)


def query_counts(query: Sequence[Any], gallery: Sequence[Any]) -> Dict[str, int]:
    """``{"queries": P, "queries_with_true_match": M}`` for records with ``pid`` and ``camid``: ``M`` counts
    the queries with a true match in the gallery (its identity from another camera, the entries that
    :func:`junk_mask` leaves in). The metrics average over those ``M`` queries and skip the others; read
    from the records alone, so it is known before any feature is extracted."""
    cameras: Dict[int, set] = {}
    for g in gallery:
        cameras.setdefault(int(g.pid), set()).add(int(g.camid))
    matched = sum(1 for q in query if cameras.get(int(q.pid), set()) - {int(q.camid)})
    return {"queries": len(query), "queries_with_true_match": matched}
