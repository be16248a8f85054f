"""Public API of the fused QAConv matching ops."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import _library  # noqa: F401  (registers fake kernels, autograd and fallbacks)
from .checks import check_head, check_pair, require_tensor, scalar_bias

Tensor = torch.Tensor

__all__ = ["qaconv_match", "qaconv_score", "native_available", "cpu_kernel", "build_info"]


def native_available(device: str = "cpu") -> bool:
    """Whether a compiled fused kernel serves ``device`` ("cpu" or "cuda")."""
    return _library.NATIVE_CUDA if str(device).startswith("cuda") else _library.NATIVE


def cpu_kernel() -> str:
    """Name of the CPU micro-kernel variant the compiled ops use (avx512, avx2, generic, generic16).

    The processor's best, or the variant the environment variable ``QACONV_CPU_KERNEL`` names
    (ValueError when it names an unknown one or one this processor cannot run). RuntimeError when the
    compiled kernels are not available.
    """
    if not _library.NATIVE:
        raise RuntimeError(f"qaconv_ext's compiled kernels are not available ({_library._IMPORT_ERROR})")
    return _library._native.cpu_kernel()


def build_info() -> Dict[str, Any]:
    """What the compiled kernels were built with and which of them run here.

    Keys: ``torch`` (the torch built against), ``target_torch`` and ``target_abi`` (the oldest torch the
    libraries load into: the stable-ABI version they were compiled for), ``cuda`` and ``cuda_archs``
    (the CUDA toolkit and the architectures of the CUDA kernels, ``sm_*`` machine code and ``compute_*``
    PTX; None and [] in a CPU-only build), ``cuda_library`` (whether the build has CUDA kernels),
    ``kernels`` (the devices whose compiled kernels are loaded now: ``cpu``, ``cuda``), ``cpu_kernel``
    and ``torch_running``. Without compiled kernels: ``kernels`` is empty and ``error`` says why.
    """
    if not _library.NATIVE:
        return {"kernels": [], "error": str(_library._IMPORT_ERROR), "torch_running": torch.__version__}
    return _library._native.build_info()


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

    Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` float32 maps are matched as bfloat16 (the
    fused bfloat16 kernel, float32 accumulation; values rounded to bfloat16, returned as float32) and
    the gradient is computed in float32 from the float32 maps (differentiable once).

    NaN in a similarity row propagates like ``torch.max``: the maximum is NaN and the index points at
    the first NaN. Infinities are ordinary values.

    Raises:
        TypeError / ValueError naming the problem (a non-tensor argument, a dtype, a rank, a size or a
        device), from the op's own input checks.
    """
    require_tensor("query", query)
    require_tensor("gallery", gallery)
    if _cpu_bfloat16_autocast(query, gallery):
        values, indices = _BFloat16Forward.apply(query, gallery)
        return (values, indices) if return_indices else values
    need_indices = bool(return_indices) or (
        torch.is_grad_enabled() and (query.requires_grad or gallery.requires_grad))
    values, indices = with_contract_errors(lambda: torch.ops.qaconv_ext.match(query, gallery, need_indices),
                                            lambda: check_pair(query, gallery))
    return (values, indices) if return_indices else values


def with_contract_errors(call, check):
    """``call()``; when the op refuses its inputs, the contract's error from ``check()`` instead.

    The compiled kernels raise the contract's dtype rules as ValueError (their stable ABI carries no
    TypeError); the same checks in Python raise TypeError for them, with the same message. They run only
    after a refusal: nothing is added to a call that succeeds. (Compiled graphs check in the fake kernels.)
    """
    if torch.compiler.is_compiling():
        return call()
    try:
        return call()
    except ValueError as exc:
        error = exc
    check()  # raises the first broken rule, as the kernel found it
    raise error


def _cpu_bfloat16_autocast(query: Tensor, gallery: Tensor) -> bool:
    """Float32 CPU maps inside ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
    return (query.device.type == "cpu" and query.dtype == torch.float32 and gallery.dtype == torch.float32
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class _BFloat16Forward(torch.autograd.Function):
    """:func:`qaconv_match` under CPU bfloat16 autocast: the forward matches bfloat16 copies of the maps
    (the fused kernel accumulates in float32; the maxima are rounded to bfloat16 and returned as float32),
    the backward runs in float32 on the float32 maps through the same argmax. Differentiable once."""

    @staticmethod
    def forward(ctx, query: Tensor, gallery: Tensor) -> Tuple[Tensor, Tensor]:
        values, indices = torch.ops.qaconv_ext.match(query.to(torch.bfloat16), gallery.to(torch.bfloat16), True)
        ctx.save_for_backward(query, gallery, indices)
        ctx.mark_non_differentiable(indices)
        return values.float(), indices

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: Tensor, _grad_indices: Optional[Tensor]):
        query, gallery, indices = ctx.saved_tensors
        need_q, need_g = ctx.needs_input_grad[:2]
        grad_query, grad_gallery = torch.ops.qaconv_ext.match_backward(grad_values.float(), indices, query, gallery,
                                                                       [need_q, need_g])
        return grad_query if need_q else None, grad_gallery if need_g else None


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
    bias = scalar_bias(bias, query)

    def check() -> None:
        _, _, _, Lq, Lg = check_pair(query, gallery)
        check_head(weight, bias, Lq + Lg, query)

    return with_contract_errors(lambda: torch.ops.qaconv_ext.score(query, gallery, weight, bias), check)
