"""Input validation shared by the public API and the fake (meta) kernels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_pair(query: Tensor, gallery: Tensor) -> Tuple[int, int, int, int, int]:
    """Validate a query/gallery pair of feature maps; return ``(P, N, d, Lq, Lg)``."""
    for name, t in (("query", query), ("gallery", gallery)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"qaconv: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"qaconv: {name} must be a 4-D feature map [batch, channels, height, width], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"qaconv: {name} has unsupported dtype {t.dtype}; "
                            "use float32, float16, bfloat16 (or float64 on the CPU)")
    if query.dtype != gallery.dtype:
        raise TypeError(f"qaconv: query and gallery dtypes differ ({query.dtype} vs {gallery.dtype})")
    if query.device != gallery.device:
        raise ValueError(f"qaconv: query and gallery are on different devices ({query.device} vs {gallery.device})")
    if query.dtype == torch.float64 and query.device.type == "cuda":
        raise TypeError("qaconv: float64 is supported on the CPU only; use float32, float16 or bfloat16 on CUDA")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"qaconv: channel mismatch: query has {query.shape[1]} channels, "
                         f"gallery has {gallery.shape[1]}")
    d = query.shape[1]
    if d == 0:
        raise ValueError("qaconv: feature maps have 0 channels")
    for name, t in (("query", query), ("gallery", gallery)):
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"qaconv: {name} has an empty spatial size {tuple(t.shape[2:])}")
    return query.shape[0], gallery.shape[0], d, query.shape[2] * query.shape[3], gallery.shape[2] * gallery.shape[3]


def check_head(weight: Tensor, bias: Optional[Tensor], length: int, device: torch.device) -> None:
    """Validate the folded head's weight ``[Lq + Lg]`` and optional scalar bias."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"qaconv_score: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"qaconv_score: weight must be floating point, got {weight.dtype}")
    if weight.numel() != length or weight.dim() > 2 or (weight.dim() == 2 and weight.shape[0] != 1):
        raise ValueError(f"qaconv_score: weight must be a vector of Lq + Lg = {length} values (shape [{length}] "
                         f"or [1, {length}]), got shape {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"qaconv_score: weight is on {weight.device}, features on {device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.numel() != 1:
            raise ValueError("qaconv_score: bias must be a number or a one-element tensor")
        if bias.device != device:
            raise ValueError(f"qaconv_score: bias is on {bias.device}, features on {device}")
