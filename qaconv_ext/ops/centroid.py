"""Approximate QAConv scores of centroid-coded gallery maps (``torch.ops.qaconv_ext.centroid_score`` and
``centroid_score_u8``).

A gallery map coded as ``Lg`` ids into a codebook ``C`` ``[K, d]`` is scored against a query map ``Q``
``[d, Lq]`` from the table ``T = C Q`` (``[K, Lq]``, one small GEMM per query) alone:
``sum_i w_i max_j T[c_j, i] + sum_j w'_j max_i T[c_j, i] + b`` -- QAConv's score with every gallery
location replaced by its centroid, ``Lq * Lg`` look-ups per pair instead of ``Lq * Lg * d`` products.
The table may be quantised to uint8 (:func:`quantize_centroid_table`): a quarter of the bytes to read per
look-up, byte-wide maxima, and the row term within half a level (``step / 2``) of the float table's.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch

from . import _library  # noqa: F401  (registers the fake kernel and the fallbacks)
from .checks import check_centroid_score, check_centroid_score_u8, require_tensor
from .match import with_contract_errors

Tensor = torch.Tensor

__all__ = ["centroid_table", "centroid_score", "quantize_centroid_table", "QuantizedTable"]

#: Levels of a quantised table: values 0..255.
U8_LEVELS = 255


class QuantizedTable(NamedTuple):
    """A query table quantised per query: ``T[p] ~ scale[p, 0] + scale[p, 1] * values[p]``."""

    values: Tensor  # uint8 [P, K, Lq]
    scale: Tensor  # float32 [P, 2]: offset, step
    colmax: Tensor  # float32 [P, K]: the maxima of the float table's rows (the column term reads these)


def centroid_table(centroids: Tensor, query_maps: Tensor) -> Tensor:
    """``T[p] = C Q_p``: float32 ``[P, K, Lq]`` from centroids ``[K, d]`` and query maps ``[P, d, h, w]``."""
    q = query_maps.detach().to("cpu", torch.float32).flatten(2)  # [P, d, Lq]
    c = centroids.detach().to("cpu", torch.float32)
    return torch.matmul(c, q).contiguous()


def quantize_centroid_table(table: Tensor) -> QuantizedTable:
    """A float table ``[P, K, Lq]`` quantised per query to 256 levels between its minimum and maximum
    (round to nearest), with the float row maxima the column term needs. A non-finite entry is a
    ``ValueError``."""
    require_tensor("table", table, "quantize_centroid_table")
    if table.dim() != 3:  # (a plain check: torch._check_value imports sympy on its first call, 0.4 s)
        raise ValueError(f"quantize_centroid_table: table must be [P, K, Lq], got shape {tuple(table.shape)}")
    t = table.detach().to("cpu", torch.float32)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError("quantize_centroid_table: the table holds non-finite values")
    if t.numel() == 0:
        P, K, _ = t.shape
        return QuantizedTable(t.to(torch.uint8), t.new_zeros((P, 2)), t.new_zeros((P, K)))
    lo, hi = torch.aminmax(t.flatten(1), dim=1)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    inv = (U8_LEVELS / span)[:, None, None]
    q = torch.addcmul(-lo[:, None, None] * inv, t, inv).round_().clamp_(0, U8_LEVELS).to(torch.uint8)
    return QuantizedTable(q, torch.stack([lo, span / U8_LEVELS], dim=1).contiguous(), t.amax(dim=2).contiguous())


def centroid_score(table: Union[Tensor, QuantizedTable], codes: Tensor, weight: Tensor,
                   bias: Union[Tensor, float, None] = None) -> Tensor:
    """Scores ``[P, N]`` (float32) of coded maps ``codes`` ``[N, Lg]`` (uint16) from query tables ``table``
    (float32 ``[P, K, Lq]``, e.g. :func:`centroid_table`, or its :func:`quantize_centroid_table`) and the
    folded head (``weight`` ``[Lq + Lg]`` float32, ``bias``). An id ``>= K`` is a ``ValueError``. Not
    differentiable."""
    require_tensor("codes", codes, "centroid_score")
    if bias is not None and not isinstance(bias, Tensor):
        bias = torch.tensor(float(bias), dtype=torch.float32)
    if isinstance(table, QuantizedTable):
        v, s, m = table
        for name, x in (("table.values", v), ("table.scale", s), ("table.colmax", m)):
            require_tensor(name, x, "centroid_score")
        return with_contract_errors(
            lambda: torch.ops.qaconv_ext.centroid_score_u8(v, s, m, codes, weight, bias),
            lambda: check_centroid_score_u8(v, s, m, codes, weight, bias))
    require_tensor("table", table, "centroid_score")
    return with_contract_errors(lambda: torch.ops.qaconv_ext.centroid_score(table, codes, weight, bias),
                                lambda: check_centroid_score(table, codes, weight, bias))
