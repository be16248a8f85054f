"""The accumulation rule of the ops, and the cast of a folded head to it, written once."""
from __future__ import annotations

from typing import Any, Tuple

import torch

__all__ = ["accumulation_dtype", "score_weights"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over ``dtype`` values are carried in: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def score_weights(weight: Any, bias: Any, dtype: torch.dtype, device: Any = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A folded head ``(weight [2L], bias [])`` as the op takes it for maps of ``dtype``: in
    :func:`accumulation_dtype` of ``dtype``, on ``device`` (default: where ``weight`` is); ``bias=None``
    is 0. The one place the head's weights are cast for scoring (differentiable, like ``Tensor.to``)."""
    w = torch.as_tensor(weight)
    device = w.device if device is None else torch.device(device)
    acc = accumulation_dtype(dtype)
    b = torch.as_tensor(0.0 if bias is None else bias)
    return w.reshape(-1).to(device, acc), b.reshape(()).to(device, acc)
