"""Binds the ``qaconv_ext::*`` dispatcher ops: native kernels, fake kernels, autograd, fallbacks.

The schemas and the CPU/CUDA kernels come from the compiled libraries that :mod:`._native` loads. This
module adds what PyTorch wants from Python: fake (meta) kernels for ``torch.compile``, autograd formulas
(to any order), a chunked PyTorch implementation for CUDA tensors when the extension was built without
CUDA (and for every device, with the schemas of :data:`SCHEMAS`, when the compiled libraries are
missing), and the one setting the CUDA kernels read from Python (``_float32_matmul_precision``).
The compiled kernels validate their inputs in C++; the kernels written here apply the same rules
through :mod:`.checks`.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence, Tuple

import torch

from . import reference
from .checks import check_backward, check_centroid_score, check_centroid_score_u8, check_head, check_pair
from .dtypes import accumulation_dtype

Tensor = torch.Tensor

_native = None
try:
    _native = importlib.import_module("qaconv_ext.ops._native")
    _native.load()  # registers the schemas and native kernels; TorchTooOldError goes to the user
    NATIVE = True
    NATIVE_CUDA = _native.with_cuda
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built: keep the package usable through the reference path
    if _native is not None and isinstance(exc, _native.TorchTooOldError):
        raise  # built, but for a newer torch: an error with its reason, not a silent fallback
    _native = None
    NATIVE = False
    NATIVE_CUDA = False
    _IMPORT_ERROR = exc

# The operator schemas as csrc/ops.cpp defines them; a build without the compiled module defines them
# from here (tests/test_ops.py checks that the two agree).
SCHEMAS = {
    "match": "match(Tensor query, Tensor gallery, bool with_indices) -> (Tensor, Tensor)",
    "score": "score(Tensor query, Tensor gallery, Tensor weight, Tensor? bias) -> Tensor",
    "match_backward": "match_backward(Tensor grad_values, Tensor indices, Tensor query, Tensor gallery, "
                      "bool[2] output_mask=[True, True]) -> (Tensor, Tensor)",
    "centroid_score": "centroid_score(Tensor table, Tensor codes, Tensor weight, Tensor? bias) -> Tensor",
    "centroid_score_u8": "centroid_score_u8(Tensor table, Tensor scale, Tensor colmax, Tensor codes, Tensor weight, "
                         "Tensor? bias) -> Tensor",
}

_LIB = torch.library.Library("qaconv_ext", "FRAGMENT")
if not NATIVE:
    for _schema in SCHEMAS.values():
        _LIB.define(_schema)

# torch.get_float32_matmul_precision() for the CUDA kernels (qaconv_score's float32 staging): the setting
# lives in torch's global context, which the stable ABI does not reach, so they call this op.
_LIB.define("_float32_matmul_precision() -> str")
_LIB.impl("_float32_matmul_precision", lambda: torch.get_float32_matmul_precision(), "CompositeExplicitAutograd")


# ----------------------------------------------------------------------------------------------
# Chunked PyTorch implementations, used where no native kernel exists for a device.
# ----------------------------------------------------------------------------------------------
_warned = set()


def _warn_fallback(device_type: str) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    why = ("the compiled extension could not be imported: %s" % _IMPORT_ERROR) if not NATIVE else \
        "qaconv_ext was built without CUDA"
    warnings.warn(f"qaconv_ext: using the chunked PyTorch path on {device_type} ({why}). "
                  "Rebuild with a CUDA toolkit for the fused kernel.", RuntimeWarning, stacklevel=3)


def _fallback_match(query: Tensor, gallery: Tensor, with_indices: bool) -> Tuple[Tensor, Tensor]:
    check_pair(query, gallery)
    _warn_fallback(query.device.type)
    if with_indices:
        values, indices = reference.qaconv_match(query, gallery, return_indices=True)
    else:
        values = reference.qaconv_match(query, gallery)
        indices = torch.empty((0,), dtype=torch.long, device=query.device)
    return values.contiguous(), indices.contiguous()


def _fallback_score(query: Tensor, gallery: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _, _, _, Lq, Lg = check_pair(query, gallery)
    check_head(weight, bias, Lq + Lg, query)
    _warn_fallback(query.device.type)
    return reference.qaconv_score(query, gallery, weight, bias).contiguous()


def _fallback_backward(grad_values: Tensor, indices: Tensor, query: Tensor, gallery: Tensor,
                       output_mask: Sequence[bool] = (True, True)) -> Tuple[Tensor, Tensor]:
    check_backward(grad_values, indices, query, gallery)
    _warn_fallback(query.device.type)
    return reference.match_backward(grad_values, indices, query, gallery, output_mask=output_mask)


def _fallback_centroid_score(table: Tensor, codes: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    check_centroid_score(table, codes, weight, bias)
    if table.device.type != "cuda":  # CUDA has no native kernel of this op: no warning there
        _warn_fallback(table.device.type)
    return reference.centroid_score(table, codes, weight, bias).contiguous()


def _fallback_centroid_score_u8(table: Tensor, scale: Tensor, colmax: Tensor, codes: Tensor, weight: Tensor,
                                bias: Optional[Tensor]) -> Tensor:
    check_centroid_score_u8(table, scale, colmax, codes, weight, bias)
    if table.device.type != "cuda":
        _warn_fallback(table.device.type)
    return reference.centroid_score_u8(table, scale, colmax, codes, weight, bias, dtype=torch.float32).contiguous()


# the centroid scores have CPU kernels only (the candidate stage of an archive search runs on the CPU)
for _key in ["CUDA"] + ([] if NATIVE else ["CPU"]):
    torch.library.impl("qaconv_ext::centroid_score", _key)(_fallback_centroid_score)
    torch.library.impl("qaconv_ext::centroid_score_u8", _key)(_fallback_centroid_score_u8)

_fallback_keys = [] if NATIVE_CUDA else ["CUDA"]
if not NATIVE:
    _fallback_keys.append("CPU")
for _key in _fallback_keys:
    torch.library.impl("qaconv_ext::match", _key)(_fallback_match)
    torch.library.impl("qaconv_ext::score", _key)(_fallback_score)
    torch.library.impl("qaconv_ext::match_backward", _key)(_fallback_backward)


# ----------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides of the outputs, for torch.compile and meta tensors.
# ----------------------------------------------------------------------------------------------
@torch.library.register_fake("qaconv_ext::match")
def _match_fake(query: Tensor, gallery: Tensor, with_indices: bool) -> Tuple[Tensor, Tensor]:
    P, N, _, Lq, Lg = check_pair(query, gallery)
    values = query.new_empty((P, N, Lq + Lg))
    indices = query.new_empty((P, N, Lq + Lg) if with_indices else (0,), dtype=torch.long)
    return values, indices


@torch.library.register_fake("qaconv_ext::score")
def _score_fake(query: Tensor, gallery: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    P, N, _, Lq, Lg = check_pair(query, gallery)
    check_head(weight, bias, Lq + Lg, query)
    return query.new_empty((P, N), dtype=accumulation_dtype(query.dtype))


@torch.library.register_fake("qaconv_ext::centroid_score")
def _centroid_score_fake(table: Tensor, codes: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    P, N = check_centroid_score(table, codes, weight, bias)
    return table.new_empty((P, N))


@torch.library.register_fake("qaconv_ext::centroid_score_u8")
def _centroid_score_u8_fake(table: Tensor, scale: Tensor, colmax: Tensor, codes: Tensor, weight: Tensor,
                            bias: Optional[Tensor]) -> Tensor:
    P, N = check_centroid_score_u8(table, scale, colmax, codes, weight, bias)
    return colmax.new_empty((P, N))


@torch.library.register_fake("qaconv_ext::match_backward")
def _backward_fake(grad_values: Tensor, indices: Tensor, query: Tensor, gallery: Tensor,
                   output_mask: Sequence[bool] = (True, True)) -> Tuple[Tensor, Tensor]:
    check_backward(grad_values, indices, query, gallery)
    need_q, need_g = output_mask
    return (query.new_empty(query.shape if need_q else (0,)),
            gallery.new_empty(gallery.shape if need_g else (0,)))


# ----------------------------------------------------------------------------------------------
# Autograd: the sparse gather/scatter through the argmax; score recomputes match in its backward;
# match_backward is differentiable in turn.
# ----------------------------------------------------------------------------------------------
def _match_setup_context(ctx, inputs, output) -> None:
    query, gallery, with_indices = inputs
    _, indices = output
    ctx.with_indices = with_indices
    ctx.save_for_backward(query, gallery, indices)


def _match_backward(ctx, grad_values: Tensor, _grad_indices: Optional[Tensor]):
    query, gallery, indices = ctx.saved_tensors
    if not ctx.with_indices:
        raise RuntimeError("qaconv_ext::match was called with with_indices=False, so it cannot be "
                           "differentiated; use qaconv_ext.qaconv_match, which asks for indices when "
                           "a gradient is needed")
    need_q, need_g = ctx.needs_input_grad[:2]
    if not (need_q or need_g):
        return None, None, None
    grad_query, grad_gallery = torch.ops.qaconv_ext.match_backward(grad_values, indices, query, gallery,
                                                                   [need_q, need_g])
    return (grad_query if need_q else None, grad_gallery if need_g else None, None)


torch.library.register_autograd("qaconv_ext::match", _match_backward, setup_context=_match_setup_context)


# match_backward is linear in grad_values and in each map: grad_query depends on (grad_values, gallery)
# only, grad_gallery on (grad_values, query) only, both through the fixed argmax indices. Its own
# gradients are therefore match_backward again (with the incoming gradient in place of the other map)
# and, for grad_values, the similarities at the indices (a gather and a dot). This gives second- and
# higher-order derivatives of qaconv_match and qaconv_score, e.g. for gradient penalties.
def _backward_setup_context(ctx, inputs, output) -> None:
    grad_values, indices, query, gallery, output_mask = inputs
    ctx.output_mask = tuple(bool(m) for m in output_mask)
    ctx.save_for_backward(grad_values, indices, query, gallery)


def _backward_backward(ctx, grad_of_gq: Optional[Tensor], grad_of_gg: Optional[Tensor]):
    grad_values, indices, query, gallery = ctx.saved_tensors
    need_gv, _, need_q, need_g = ctx.needs_input_grad[:4]
    # a gradient switched off in output_mask was an empty [0] tensor: nothing flows back through it
    dq = grad_of_gq if ctx.output_mask[0] else None
    dg = grad_of_gg if ctx.output_mask[1] else None
    out_gv = out_q = out_g = None
    if need_gv:
        terms = []
        if dq is not None:
            terms.append(reference.similarity_at(dq.to(query.dtype), gallery, indices))
        if dg is not None:
            terms.append(reference.similarity_at(query, dg.to(gallery.dtype), indices))
        out_gv = sum(terms).to(grad_values.dtype) if terms else torch.zeros_like(grad_values)
    if need_q and dg is not None:
        out_q = torch.ops.qaconv_ext.match_backward(grad_values, indices, query, dg.to(gallery.dtype),
                                                    [True, False])[0]
    if need_g and dq is not None:
        out_g = torch.ops.qaconv_ext.match_backward(grad_values, indices, dq.to(query.dtype), gallery,
                                                    [False, True])[1]
    return out_gv, None, out_q, out_g, None


torch.library.register_autograd("qaconv_ext::match_backward", _backward_backward,
                                setup_context=_backward_setup_context)


def _score_setup_context(ctx, inputs, output) -> None:
    query, gallery, weight, bias = inputs
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(query, gallery, weight)


def _score_backward(ctx, grad: Tensor):
    query, gallery, weight = ctx.saved_tensors
    need_q, need_g, need_w, need_b = ctx.needs_input_grad
    grad_q = grad_g = grad_w = grad_b = None
    if need_b:
        grad_b = grad.sum().reshape(ctx.bias_shape).to(ctx.bias_dtype)
    if need_q or need_g or need_w:
        values, indices = torch.ops.qaconv_ext.match(query, gallery, True)
        if need_w:
            grad_w = torch.einsum("pn,pnk->k", grad, values.to(grad.dtype)).to(weight.dtype).reshape(weight.shape)
        if need_q or need_g:
            grad_values = grad[:, :, None] * weight.reshape(-1).to(grad.dtype)[None, None, :]
            grad_q, grad_g = torch.ops.qaconv_ext.match_backward(grad_values, indices, query, gallery,
                                                                 [need_q, need_g])
            grad_q = grad_q if need_q else None
            grad_g = grad_g if need_g else None
    return grad_q, grad_g, grad_w, grad_b


torch.library.register_autograd("qaconv_ext::score", _score_backward, setup_context=_score_setup_context)
