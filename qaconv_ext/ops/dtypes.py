"""The accumulation rule of the ops, written once."""
from __future__ import annotations

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums over ``dtype`` values are carried in: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
