"""Approximate QAConv scores of centroid-coded gallery maps (``torch.ops.qaconv_ext.centroid_score``).

A gallery map coded as ``Lg`` ids into a codebook ``C`` ``[K, d]`` is scored against a query map ``Q``
``[d, Lq]`` from the table ``T = C Q`` (``[K, Lq]``, one small GEMM per query) alone:
``sum_i w_i max_j T[c_j, i] + sum_j w'_j max_i T[c_j, i] + b`` -- QAConv's score with every gallery
location replaced by its centroid, ``Lq * Lg`` look-ups per pair instead of ``Lq * Lg * d`` products.
"""
from __future__ import annotations

from typing import Union

import torch

from . import _library  # noqa: F401  (registers the fake kernel and the fallbacks)
from .checks import check_centroid_score, require_tensor
from .match import with_contract_errors

Tensor = torch.Tensor

__all__ = ["centroid_table", "centroid_score"]


def centroid_table(centroids: Tensor, query_maps: Tensor) -> Tensor:
    """``T[p] = C Q_p``: float32 ``[P, K, Lq]`` from centroids ``[K, d]`` and query maps ``[P, d, h, w]``."""
    q = query_maps.detach().to("cpu", torch.float32).flatten(2)  # [P, d, Lq]
    c = centroids.detach().to("cpu", torch.float32)
    return torch.matmul(c, q).contiguous()


def centroid_score(table: Tensor, codes: Tensor, weight: Tensor, bias: Union[Tensor, float, None] = None
                   ) -> Tensor:
    """Scores ``[P, N]`` (float32) of coded maps ``codes`` ``[N, Lg]`` (uint16) from query tables ``table``
    ``[P, K, Lq]`` (float32, e.g. :func:`centroid_table`) and the folded head (``weight`` ``[Lq + Lg]``
    float32, ``bias``). An id ``>= K`` is a ``ValueError``. Not differentiable."""
    require_tensor("table", table, "centroid_score")
    require_tensor("codes", codes, "centroid_score")
    if bias is not None and not isinstance(bias, Tensor):
        bias = torch.tensor(float(bias), dtype=torch.float32)
    return with_contract_errors(lambda: torch.ops.qaconv_ext.centroid_score(table, codes, weight, bias),
                                lambda: check_centroid_score(table, codes, weight, bias))
