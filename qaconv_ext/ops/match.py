"""Public API of the fused QAConv matching ops."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _library  # noqa: F401  (registers fake kernels, autograd and fallbacks)
from .checks import require_tensor, scalar_bias

Tensor = torch.Tensor

__all__ = ["qaconv_match", "qaconv_score", "native_available"]


def native_available(device: str = "cpu") -> bool:
    """Whether a compiled fused kernel serves ``device`` ("cpu" or "cuda")."""
    return _library.NATIVE_CUDA if str(device).startswith("cuda") else _library.NATIVE


def qaconv_match(query: Tensor, gallery: Tensor, return_indices: bool = False
                 ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Match every query map with every gallery map by query-adaptive convolution.

    For pair ``(p, n)`` the local similarities ``S[s, r] = <query[p, :, s], gallery[n, :, r]>`` are
    max-pooled in both directions without ever storing ``S``.

    Args:
        query: ``[P, d, hq, wq]`` feature maps (float32/16, bfloat16; float64 on the CPU),
            contiguous or channels_last.
        gallery: ``[N, d, hg, wg]`` feature maps of the same dtype and device.
        return_indices: also return the argmax locations (ties resolve to the smallest index).

    Returns:
        values ``[P, N, Lq + Lg]`` in the input dtype: the first ``Lq`` are, per query location, the
        max over gallery locations; the next ``Lg``, per gallery location, the max over query
        locations. With ``return_indices``, also int64 indices into the *other* image, same shape.

    NaN in a similarity row propagates like ``torch.max``: the maximum is NaN and the index points at
    the first NaN. Infinities are ordinary values.

    Raises:
        TypeError / ValueError naming the problem (a non-tensor argument, a dtype, a rank, a size or a
        device), from the op's own input checks.
    """
    require_tensor("query", query)
    require_tensor("gallery", gallery)
    need_indices = bool(return_indices) or (
        torch.is_grad_enabled() and (query.requires_grad or gallery.requires_grad))
    values, indices = torch.ops.qaconv_ext.match(query, gallery, need_indices)
    return (values, indices) if return_indices else values


def qaconv_score(query: Tensor, gallery: Tensor, weight: Tensor,
                 bias: Optional[Union[Tensor, float]] = None) -> Tensor:
    """One score per pair, ``values @ weight + bias``, with the head folded into the kernel epilogue.

    Args:
        query, gallery: as for :func:`qaconv_match`.
        weight: ``[Lq + Lg]`` (or ``[1, Lq + Lg]``) weights, one per max value (query-location maxima
            first).
        bias: optional scalar (number or one-element tensor).

    Returns:
        ``[P, N]`` float32 scores (float64 for float64 inputs). Differentiable in all four inputs, to
        any order; the backward recomputes the matching with indices instead of storing it.

    Raises:
        TypeError / ValueError naming the problem, as :func:`qaconv_match`, and for a weight that is
        not Lq + Lg values or a bias that is not one.
    """
    require_tensor("query", query)
    require_tensor("gallery", gallery)
    require_tensor("weight", weight, "qaconv_score")
    return torch.ops.qaconv_ext.score(query, gallery, weight, scalar_bias(bias, query))
