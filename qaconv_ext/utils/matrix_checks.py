"""Checks of score and distance matrices shared by the metrics and the post-processing.

A healthy matrix costs one reduction (``aminmax``); only a failing one is searched for the count and the
position of its bad entries, which the one-line message reports.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["check_matrix"]


def _first(mask: torch.Tensor) -> Tuple[int, int]:
    """``(row, column)`` of the first True entry of a 2-D mask, in row-major order."""
    flat = int(mask.reshape(-1).nonzero()[0, 0])
    cols = mask.shape[1]
    return flat // cols, flat % cols


def check_matrix(t: torch.Tensor, name: str, *, what: str = "distances", labels: Tuple[str, str] = ("row", "column"),
                 row_offset: int = 0, scope: str = "", non_negative: Optional[str] = None) -> None:
    """Raise ``ValueError`` when the 2-D ``t`` holds NaN or Inf (or, with ``non_negative``
    given, a negative entry; ``non_negative`` is the advice appended to that message).

    The message is one line: ``"<name>: <k> of <n> <what><scope> are not finite (NaN or Inf); the first at
    <row label> <i>, <column label> <j>"``; ``row_offset`` is added to the row numbers (for row blocks of a
    larger matrix, with ``scope`` such as ``" in rows 100:200"``).
    """
    if t.numel() == 0:
        return
    if t.is_floating_point():
        lo, hi = torch.aminmax(t)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            bad = ~torch.isfinite(t)
            i, j = _first(bad)
            raise ValueError(f"{name}: {int(bad.sum())} of {t.numel()} {what}{scope} are not finite (NaN or Inf); "
                             f"the first at {labels[0]} {i + row_offset}, {labels[1]} {j}")
        if non_negative is None or float(lo) >= 0:
            return
    elif non_negative is None or t.dtype == torch.bool or int(t.min()) >= 0:
        return
    neg = t < 0
    i, j = _first(neg)
    raise ValueError(f"{name}: {int(neg.sum())} of {t.numel()} {what}{scope} are negative (the first at "
                     f"{labels[0]} {i + row_offset}, {labels[1]} {j}: {float(t[i, j]):.4g}); {non_negative}")
