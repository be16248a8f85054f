"""The ops' input contract for the kernels written in Python: the fake (meta) kernels and the fallbacks.

The compiled kernels check the same rules in C++ (``csrc/checks.h``), with the same error types and
the same messages; ``tests/test_ops.py`` holds the two to each other. What only Python sees lives here
too: :func:`require_tensor` (a non-tensor argument is a ``TypeError``, not a schema error) and
:func:`scalar_bias` (a number given as bias becomes a tensor). The checks use ``torch._check_*``, so
they also hold under ``torch.compile`` with symbolic sizes.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .dtypes import accumulation_dtype

Tensor = torch.Tensor

__all__ = ["FLOAT_DTYPES", "check_pair", "check_head", "check_backward", "check_centroid_score",
           "check_centroid_score_u8", "require_tensor",
           "scalar_bias"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: Tensor) -> list:
    """Sizes as C++ prints them: ``[2, 8, 3]``."""
    return list(t.shape)


def check_pair(query: Tensor, gallery: Tensor) -> Tuple[int, int, int, int, int]:
    """Validate a query/gallery pair of feature maps; return ``(P, N, d, Lq, Lg)``."""
    for name, t in (("query", query), ("gallery", gallery)):
        torch._check_value(t.dim() == 4, lambda: f"qaconv: {name} must be a 4-D feature map "
                           f"[batch, channels, height, width], got shape {_shape(t)}")
    torch._check_type(query.dtype == gallery.dtype,
                      lambda: f"qaconv: query and gallery dtypes differ ({query.dtype} vs {gallery.dtype})")
    torch._check_type(query.dtype in FLOAT_DTYPES, lambda: f"qaconv: unsupported dtype {query.dtype}; "
                      "use float32, float16, bfloat16 (or float64 on the CPU)")
    torch._check_value(query.device == gallery.device, lambda: "qaconv: query and gallery are on different "
                       f"devices ({query.device} vs {gallery.device})")
    torch._check_type(not (query.dtype == torch.float64 and query.device.type == "cuda"),
                      lambda: "qaconv: float64 is supported on the CPU only; use float32, float16 or bfloat16 "
                      "on CUDA")
    torch._check_value(query.shape[1] == gallery.shape[1], lambda: "qaconv: channel mismatch: query has "
                       f"{query.shape[1]} channels, gallery has {gallery.shape[1]}")
    torch._check_value(query.shape[1] > 0, lambda: "qaconv: feature maps have 0 channels")
    for name, t in (("query", query), ("gallery", gallery)):
        torch._check_value(t.shape[2] > 0 and t.shape[3] > 0,
                           lambda: f"qaconv: {name} has an empty spatial size {_shape(t)[2:]}")
    return (query.shape[0], gallery.shape[0], query.shape[1], query.shape[2] * query.shape[3],
            gallery.shape[2] * gallery.shape[3])


def check_head(weight: Tensor, bias: Optional[Tensor], length: int, query: Tensor) -> None:
    """Validate the folded head: ``length`` = Lq + Lg weights (shape ``[L]`` or ``[1, L]``), a one-value bias."""
    torch._check_type(weight.is_floating_point(),
                      lambda: f"qaconv_score: weight must be floating point, got {weight.dtype}")
    vector = weight.dim() == 1 or (weight.dim() == 2 and weight.shape[0] == 1)
    torch._check_value(vector and weight.numel() == length,
                       lambda: f"qaconv_score: weight must be a vector of Lq + Lg = {length} values "
                       f"(shape [{length}] or [1, {length}]), got shape {_shape(weight)}")
    torch._check_value(weight.device == query.device,
                       lambda: f"qaconv_score: weight is on {weight.device}, features on {query.device}")
    if bias is not None:
        torch._check_value(bias.numel() == 1,
                           lambda: f"qaconv_score: bias must hold one value, got shape {_shape(bias)}")
        torch._check_value(bias.device == query.device,
                           lambda: f"qaconv_score: bias is on {bias.device}, features on {query.device}")


def check_backward(grad_values: Tensor, indices: Tensor, query: Tensor, gallery: Tensor) -> Tuple[int, ...]:
    """Validate the arguments of ``match_backward``; return ``(P, N, d, Lq, Lg)``."""
    dims = check_pair(query, gallery)
    P, N, _, Lq, Lg = dims
    L = Lq + Lg
    torch._check_value(grad_values.dim() == 3 and grad_values.shape[0] == P and grad_values.shape[1] == N
                       and grad_values.shape[2] == L,
                       lambda: f"qaconv: grad_values must be [P, N, Lq + Lg] = [{P}, {N}, {L}], "
                       f"got shape {_shape(grad_values)}")
    torch._check_value(indices.shape == grad_values.shape,
                       lambda: f"qaconv: indices must have the shape of grad_values {_shape(grad_values)}, "
                       f"got shape {_shape(indices)}")
    torch._check_type(indices.dtype == torch.long, lambda: f"qaconv: indices must be int64, got {indices.dtype}")
    torch._check_value(grad_values.device == indices.device, lambda: "qaconv: grad_values and indices are on "
                       f"different devices ({grad_values.device} vs {indices.device})")
    torch._check_value(grad_values.device == query.device,
                       lambda: f"qaconv: grad_values is on {grad_values.device}, features on {query.device}")
    return dims


def check_centroid_score(table: Tensor, codes: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tuple[int, int]:
    """Validate the arguments of ``centroid_score`` (as ``csrc/cpu/centroid_cpu.cpp`` does); return ``(P, N)``."""
    torch._check_value(table.dim() == 3, lambda: f"centroid_score: table must be [P, K, Lq], got shape "
                       f"{_shape(table)}")
    torch._check_type(table.dtype in (torch.float32, torch.float64),
                      lambda: f"centroid_score: table must be float32, got {table.dtype}")
    _check_codes_and_head("centroid_score", table.shape[2], codes, weight, bias)
    return table.shape[0], codes.shape[0]


def check_centroid_score_u8(table: Tensor, scale: Tensor, colmax: Tensor, codes: Tensor, weight: Tensor,
                            bias: Optional[Tensor]) -> Tuple[int, int]:
    """Validate the arguments of ``centroid_score_u8`` (as ``csrc/cpu/centroid_cpu.cpp`` does); return ``(P, N)``."""
    op = "centroid_score_u8"
    torch._check_value(table.dim() == 3, lambda: f"{op}: table must be [P, K, Lq], got shape {_shape(table)}")
    torch._check_type(table.dtype == torch.uint8, lambda: f"{op}: table must be uint8, got {table.dtype}")
    P, K, _ = table.shape
    torch._check_value(scale.dim() == 2 and tuple(scale.shape) == (P, 2),
                       lambda: f"{op}: scale must be [P, 2] (offset, step), got shape {_shape(scale)}")
    torch._check_value(colmax.dim() == 2 and tuple(colmax.shape) == (P, K),
                       lambda: f"{op}: colmax must be [P, K], got shape {_shape(colmax)}")
    torch._check_type(scale.dtype == torch.float32 and colmax.dtype == torch.float32,
                      lambda: f"{op}: scale and colmax must be float32, got {scale.dtype} and {colmax.dtype}")
    _check_codes_and_head(op, table.shape[2], codes, weight, bias)
    return P, codes.shape[0]


def _check_codes_and_head(op: str, Lq: int, codes: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """The rules both centroid scores share: codes ``[N, Lg]`` of an integer dtype, ``Lq + Lg`` weights, a scalar
    bias."""
    torch._check_value(codes.dim() == 2, lambda: f"{op}: codes must be [N, Lg], got shape {_shape(codes)}")
    torch._check_type(not codes.is_floating_point() and not codes.is_complex() and codes.dtype != torch.bool,
                      lambda: f"{op}: codes must be uint16, got {codes.dtype}")
    length = Lq + codes.shape[1]
    torch._check_value(weight.numel() == length, lambda: f"{op}: weight must hold Lq + Lg = {length} values, got "
                       f"{weight.numel()}")
    if bias is not None:
        torch._check_value(bias.numel() == 1, lambda: f"{op}: bias must be a scalar, got shape {_shape(bias)}")


def require_tensor(name: str, value: Any, op: str = "qaconv") -> None:
    """A ``TypeError`` naming the argument when ``value`` is not a tensor (before the dispatcher sees it)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def scalar_bias(bias: Any, query: Tensor) -> Optional[Tensor]:
    """``bias`` as a tensor: a number becomes a scalar in the accumulation dtype, on the features' device."""
    if bias is None or isinstance(bias, torch.Tensor):
        return bias
    try:
        value = float(bias)
    except (TypeError, ValueError):
        raise TypeError("qaconv_score: bias must be a number or a one-element tensor, "
                        f"got {type(bias).__name__}") from None
    return torch.tensor(value, dtype=accumulation_dtype(query.dtype), device=query.device)
