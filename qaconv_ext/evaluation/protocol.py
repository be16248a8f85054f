"""The evaluation protocol's rule for gallery entries a query ignores (Market-1501, also used for
DukeMTMC-reID and MSMT17)."""
from __future__ import annotations

from typing import Any

__all__ = ["junk_mask"]


def junk_mask(query_pids: Any, query_camids: Any, gallery_pids: Any, gallery_camids: Any) -> Any:
    """True where a gallery entry shows the query's identity in the query's camera: such entries are
    neither a match nor a mistake, and ranking leaves them out.

    Elementwise with broadcasting, on numpy arrays or torch tensors alike: one query's ``pid`` and
    ``camid`` against gallery vectors ``[N]``, or a block of queries ``[B, 1]`` against ``[B, N]``.
    """
    return (gallery_pids == query_pids) & (gallery_camids == query_camids)
