"""The op contract against the float64 chunked reference, on every device present (cpu, cuda).

Inputs are random with a seed per test case (the ``gen`` fixture). Kernel-specific paths of the CUDA
kernels (tensor-core precision modes, tile-crossing sizes, the poison test) are in test_cuda.py.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

import qaconv_ext
from helpers import HAS_CUDA, bad_op_calls, device_dtypes, error_of, rel_err, score_err, unit_maps
from qaconv_ext import reference
from qaconv_ext.ops import _library

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Spatial sizes (hq, wq, hg, wg): typical 24x8, odd 7x5, and query/gallery of different sizes.
SHAPES = [(24, 8, 24, 8), (7, 5, 7, 5), (7, 5, 3, 6)]
BATCHES = [(1, 1), (7, 33), (33, 7)]


def index_tol(device: str, dtype: torch.dtype) -> float:
    """How far the reference similarity at a returned index may lie below the reference maximum."""
    if device == "cuda" and dtype == torch.float32:
        return 1e-5  # the CUDA kernels sum the channels in another order than the CPU's GEMM
    return 4 * TOL[dtype] + 1e-12


def test_native_kernel_is_built(device):
    assert qaconv_ext.native_available(device), f"the {device} kernels are not built; run `make setup`"


def _idx_ok(query, gallery, values, indices, tol):
    """Reference S at the returned index is within tol of the reference maximum, in both directions."""
    S = reference.similarity(query.cpu().double(), gallery.cpu().double())  # [P, N, Lq, Lg]
    indices = indices.cpu()
    Lq = S.shape[2]
    at_row = torch.gather(S, 3, indices[..., :Lq].unsqueeze(-1)).squeeze(-1)
    at_col = torch.gather(S, 2, indices[..., Lq:].unsqueeze(2)).squeeze(2)
    best_row, best_col = S.amax(3), S.amax(2)
    return (at_row - best_row).abs().max().item() <= tol and (at_col - best_col).abs().max().item() <= tol


@pytest.mark.parametrize("device, dtype", device_dtypes(ALL_DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_match_values_and_indices(device, dtype, shape, gen):
    hq, wq, hg, wg = shape
    for P, N in BATCHES:
        q = unit_maps(P, 16, hq, wq, dtype, gen, device)
        g = unit_maps(N, 16, hg, wg, dtype, gen, device)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        ref = reference.qaconv_match(q.cpu().double(), g.cpu().double())
        assert values.shape == (P, N, hq * wq + hg * wg) and values.dtype == dtype
        assert values.device == q.device and indices.dtype == torch.long
        assert rel_err(values, ref) <= TOL[dtype], (dtype, shape, P, N)
        # Index checks use the inputs as the kernel saw them (rounded to dtype), in float64.
        assert _idx_ok(q, g, values, indices, index_tol(device, dtype)), (dtype, shape, P, N)
        assert torch.equal(qaconv_ext.qaconv_match(q, g), values)  # the values-only path agrees


@pytest.mark.parametrize("device, dtype", device_dtypes(ALL_DTYPES))
def test_score_matches_reference(device, dtype, gen):
    for (hq, wq, hg, wg), (P, N) in itertools.product(SHAPES, BATCHES):
        q = unit_maps(P, 24, hq, wq, dtype, gen, device)
        g = unit_maps(N, 24, hg, wg, dtype, gen, device)
        w = torch.randn(hq * wq + hg * wg, generator=gen).to(device)
        for weight, bias in ((w, None), (w, 0.25), (w, torch.tensor([-1.5], device=device)), (w[None], None)):
            out = qaconv_ext.qaconv_score(q, g, weight, bias)
            assert out.shape == (P, N) and out.device == q.device
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert score_err(out, q, g, w, bias) <= max(TOL[dtype], 1e-6), (dtype, P, N)


def test_channels_last_and_noncontiguous_inputs(device, gen):
    q = unit_maps(5, 32, 24, 8, torch.float32, gen, device)
    g = unit_maps(9, 32, 24, 8, torch.float32, gen, device)
    ref = reference.qaconv_match(q.cpu().double(), g.cpu().double())
    out = qaconv_ext.qaconv_match(q.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last))
    assert rel_err(out, ref) <= 1e-6
    wide = torch.cat([g, g], dim=1)[:, :32]  # a non-contiguous view with the same values
    assert not wide.is_contiguous()
    assert rel_err(qaconv_ext.qaconv_match(q, wide), ref) <= 1e-6
    swapped = q.transpose(2, 3).contiguous().transpose(2, 3)  # strides of neither standard layout
    assert rel_err(qaconv_ext.qaconv_match(swapped, g), ref) <= 1e-6


@pytest.mark.parametrize("device, dtype", device_dtypes([torch.float64, torch.float32]))
def test_ties_resolve_to_smallest_index(device, dtype, gen):
    # Small-integer features: every dot product is exact, so repeated locations make exact ties;
    # the op must agree with torch.max (first occurrence).
    q = torch.randint(-2, 3, (3, 8, 2, 2), generator=gen).repeat(1, 1, 2, 3)
    g = torch.randint(-2, 3, (4, 8, 2, 2), generator=gen).repeat(1, 1, 3, 1)
    _, indices = qaconv_ext.qaconv_match(q.to(device, dtype), g.to(device, dtype), return_indices=True)
    _, ref_idx = reference.qaconv_match(q.double(), g.double(), return_indices=True)
    assert torch.equal(indices.cpu(), ref_idx)


def test_unwritten_outputs_would_show(gen):
    # With deterministic mode PyTorch fills fresh CPU allocations with NaN: every element must be
    # written (test_cuda.py poisons the CUDA allocator's blocks instead).
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(4)).all()  # the poison is active
        q, g = unit_maps(7, 16, 7, 5, torch.float32, gen), unit_maps(33, 16, 7, 5, torch.float32, gen)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        score = qaconv_ext.qaconv_score(q, g, torch.ones(70))
        assert torch.isfinite(values).all() and torch.isfinite(score).all()
        assert int(indices.min()) >= 0 and int(indices.max()) < 35
    finally:
        torch.use_deterministic_algorithms(old)


def test_empty_batches_give_empty_results(device):
    for P, N in [(0, 5), (5, 0), (0, 0)]:
        q, g = torch.ones(P, 8, 3, 3, device=device), torch.ones(N, 8, 3, 3, device=device)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        assert values.shape == (P, N, 18) and indices.shape == (P, N, 18)
        assert qaconv_ext.qaconv_score(q, g, torch.ones(18, device=device)).shape == (P, N)


def test_nan_propagates_like_torch_max(device, gen):
    q = unit_maps(3, 8, 3, 2, torch.float32, gen)
    g = unit_maps(4, 8, 2, 2, torch.float32, gen)
    q[1, :, 2, 1] = float("nan")  # query 1, location s = 5
    values, indices = qaconv_ext.qaconv_match(q.to(device), g.to(device), return_indices=True)
    values, indices = values.cpu(), indices.cpu()
    ref_v, ref_i = reference.qaconv_match(q, g, return_indices=True)
    assert torch.isnan(values[1, :, 5]).all()  # its own row maxima
    assert torch.isnan(values[1, :, 6:]).all()  # every gallery location sees the NaN row
    assert (indices[1, :, 6:] == 5).all()  # ... and points at it
    assert torch.isfinite(values[[0, 2]]).all() and torch.isfinite(values[1, :, :5]).all()
    assert torch.allclose(values.nan_to_num(7.0), ref_v.nan_to_num(7.0), atol=1e-6)
    assert torch.equal(indices[1, :, 6:], ref_i[1, :, 6:])
    assert torch.isnan(qaconv_ext.qaconv_score(q.to(device), g.to(device), torch.ones(10, device=device))[1]).all()


@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (7, 5, 4, 5)])  # Lg = 4 and 20: below / across 16 lanes
def test_values_only_path_with_nan_and_inf(device, shape, gen):
    # score and values-only match take a fast path for finite blocks; blocks with NaN or inf fall back
    hq, wq, hg, wg = shape
    q = unit_maps(3, 8, hq, wq, torch.float32, gen)
    g = unit_maps(5, 8, hg, wg, torch.float32, gen)
    q[1, :, 0, 1] = float("nan")
    g[2, 0, 1, 0] = float("inf")
    g[3, 1, 0, 0] = -float("inf")
    ref = reference.qaconv_match(q.double(), g.double())
    qd, gd = q.to(device), g.to(device)
    for values in (qaconv_ext.qaconv_match(qd, gd), qaconv_ext.qaconv_match(qd, gd, return_indices=True)[0]):
        values = values.cpu()
        assert torch.equal(torch.isnan(values), torch.isnan(ref)) and torch.equal(torch.isinf(values), torch.isinf(ref))
        finite = torch.isfinite(ref)
        assert torch.allclose(values[finite].double(), ref[finite], atol=1e-6)
        assert torch.equal(values[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)].float())
    w = torch.rand(hq * wq + hg * wg, generator=gen)
    score = qaconv_ext.qaconv_score(qd, gd, w.to(device)).cpu()
    ref_score = reference.qaconv_score(q.double(), g.double(), w.double())
    assert torch.equal(torch.isnan(score), torch.isnan(ref_score))
    assert torch.equal(score[torch.isinf(ref_score)], ref_score[torch.isinf(ref_score)].float())
    ok = torch.isfinite(ref_score)
    assert torch.allclose(score[ok].double(), ref_score[ok], atol=1e-5)


def test_infinities_are_ordinary_values(device):
    q = torch.zeros(1, 1, 1, 3)
    g = torch.zeros(1, 1, 1, 2)
    q[0, 0, 0] = torch.tensor([1.0, -1.0, 2.0])
    g[0, 0, 0] = torch.tensor([float("inf"), 1.0])
    values, indices = qaconv_ext.qaconv_match(q.to(device), g.to(device), return_indices=True)
    ref_v, ref_i = reference.qaconv_match(q, g, return_indices=True)
    assert torch.equal(values.cpu(), ref_v) and torch.equal(indices.cpu(), ref_i)


@pytest.mark.parametrize("device, dtype", device_dtypes([torch.float64, torch.float32, torch.bfloat16]))
def test_match_gradients_against_reference_autograd(device, dtype, gen):
    q = unit_maps(7, 16, 7, 5, dtype, gen, device).requires_grad_()
    g = unit_maps(5, 16, 3, 6, dtype, gen, device).requires_grad_()
    upstream = torch.randn(7, 5, 35 + 18, generator=gen, dtype=torch.float64)
    values = qaconv_ext.qaconv_match(q, g)
    dq, dg = torch.autograd.grad(values, (q, g), upstream.to(device, dtype))
    qr, gr = q.detach().cpu().double().requires_grad_(), g.detach().cpu().double().requires_grad_()
    rdq, rdg = torch.autograd.grad(reference.qaconv_match(qr, gr), (qr, gr), upstream)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert dq.dtype == dtype and dg.dtype == dtype and dq.device == q.device
    assert rel_err(dq, rdq) <= tol and rel_err(dg, rdg) <= tol


@pytest.mark.parametrize("mask", [(True, False), (False, True), (False, False)])
def test_backward_output_mask(device, mask, gen):
    # the gradients asked for are the full ones; the others are empty [0] tensors, not computed
    q = unit_maps(6, 16, 7, 5, torch.float32, gen, device)
    g = unit_maps(9, 16, 3, 6, torch.float32, gen, device)
    values, indices = torch.ops.qaconv_ext.match(q, g, True)
    upstream = torch.randn(values.shape, generator=gen).to(device)
    qc, gc, uc, ic = q.cpu().double(), g.cpu().double(), upstream.cpu().double(), indices.cpu()
    full = reference.match_backward(uc, ic, qc, gc)
    got = torch.ops.qaconv_ext.match_backward(upstream, indices, q, g, list(mask))
    ref = reference.match_backward(uc, ic, qc, gc, output_mask=mask)
    for need, out, r, f, like in zip(mask, got, ref, full, (q, g)):
        if need:
            assert out.shape == like.shape and rel_err(out, f) <= 1e-6 and torch.equal(r, f)
        else:
            assert out.shape == (0,) and r.shape == (0,)


def test_autograd_skips_the_gallery_gradient(device, gen, monkeypatch):
    # the class memory of training is a gallery without gradient: its half of the backward is not run
    q = unit_maps(4, 8, 3, 2, torch.float32, gen, device).requires_grad_()
    g = unit_maps(5, 8, 3, 2, torch.float32, gen, device)
    w = torch.randn(12, generator=gen).to(device)
    masks = []
    real = torch.ops.qaconv_ext.match_backward

    def spy(*args):
        masks.append(tuple(args[4]))
        return real(*args)

    monkeypatch.setattr(torch.ops.qaconv_ext, "match_backward", spy)
    qaconv_ext.qaconv_match(q, g).sum().backward()
    qaconv_ext.qaconv_score(q, g, w, 0.0).sum().backward()
    assert masks == [(True, False), (True, False)]
    qr, gr, wr = q.detach().cpu().double().requires_grad_(), g.cpu().double(), w.cpu().double()
    (reference.qaconv_match(qr, gr).sum() + reference.qaconv_score(qr, gr, wr).sum()).backward()
    assert rel_err(q.grad, qr.grad) <= 1e-6


@pytest.mark.parametrize("device, dtype", device_dtypes([torch.float64, torch.float32, torch.bfloat16]))
def test_score_gradients_against_reference_autograd(device, dtype, gen):
    q = unit_maps(6, 12, 4, 3, dtype, gen, device).requires_grad_()
    g = unit_maps(9, 12, 4, 3, dtype, gen, device).requires_grad_()
    w = torch.randn(24, generator=gen, dtype=torch.float64).to(device, torch.promote_types(dtype, torch.float32))
    w.requires_grad_()
    b = torch.tensor([0.3], dtype=w.dtype, device=device, requires_grad=True)
    upstream = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    out = qaconv_ext.qaconv_score(q, g, w, b)
    grads = torch.autograd.grad(out, (q, g, w, b), upstream.to(device, out.dtype))
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, g, w, b)]
    qr, gr, wr, br = ref_in
    ref = torch.autograd.grad(reference.qaconv_match(qr, gr) @ wr + br, ref_in, upstream)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, want, like in zip(grads, ref, (q, g, w, b)):
        assert got.shape == like.shape and got.dtype == like.dtype and rel_err(got, want) <= tol


def test_weight_given_as_a_row(gen):
    # [1, L] weights: the same scores, and a gradient of the weight's own shape
    q = unit_maps(3, 8, 3, 2, torch.float64, gen)
    g = unit_maps(4, 8, 2, 3, torch.float64, gen)
    w = torch.randn(1, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    out = qaconv_ext.qaconv_score(q, g, w, 0.5)
    assert torch.equal(out, qaconv_ext.qaconv_score(q, g, w.detach().reshape(-1), 0.5))
    (grad_w,) = torch.autograd.grad(out.sum(), w)
    assert grad_w.shape == (1, 12)
    assert rel_err(grad_w, reference.qaconv_match(q, g).sum((0, 1))) <= 1e-12


def test_gradcheck_float64(gen):
    q = unit_maps(2, 3, 2, 2, torch.float64, gen).requires_grad_()
    g = unit_maps(3, 3, 1, 3, torch.float64, gen).requires_grad_()
    w = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: qaconv_ext.qaconv_match(a, b), (q, g))
    assert torch.autograd.gradcheck(lambda a, b, c: qaconv_ext.qaconv_score(a, b, c, 0.1), (q, g, w))


def _well_separated(q, g, gap=1e-5):
    """Whether every row and column maximum of S beats the runner-up by ``gap`` (finite differences
    then never cross an argmax)."""
    S = reference.similarity(q.detach().cpu().double(), g.detach().cpu().double())
    top_row, top_col = S.topk(2, dim=3).values, S.topk(2, dim=2).values
    return bool((top_row[..., 0] - top_row[..., 1] > gap).all() and (top_col[:, :, 0] - top_col[:, :, 1] > gap).all())


def test_gradgradcheck_float64(gen):
    # second (and, through match_backward's own gradient, third) derivatives of both ops
    q = unit_maps(2, 3, 2, 2, torch.float64, gen).requires_grad_()
    g = unit_maps(3, 3, 1, 3, torch.float64, gen).requires_grad_()
    assert _well_separated(q, g)
    w = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, c: qaconv_ext.qaconv_match(a, c), (q, g))
    assert torch.autograd.gradgradcheck(lambda a, c, v, u: qaconv_ext.qaconv_score(a, c, v, u), (q, g, w, b))
    values, indices = torch.ops.qaconv_ext.match(q.detach(), g.detach(), True)
    upstream = torch.randn(values.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    for mask in ([True, True], [True, False], [False, True]):
        def backward(u, a, c, mask=mask):
            return tuple(t for t, m in zip(torch.ops.qaconv_ext.match_backward(u, indices, a, c, mask), mask) if m)

        assert torch.autograd.gradcheck(backward, (upstream, q, g))
        assert torch.autograd.gradgradcheck(backward, (upstream, q, g))


def _gradient_penalty(score_fn, q, g, w, on):
    """d/d(q, g, w) of the squared norms of d score.sum() / d(the maps named in ``on``)."""
    q, g, w = (t.detach().clone().requires_grad_() for t in (q, g, w))
    maps = [{"q": q, "g": g}[name] for name in on]
    first = torch.autograd.grad(score_fn(q, g, w).sum(), maps, create_graph=True)
    penalty = sum(d.pow(2).sum() for d in first)
    return torch.autograd.grad(penalty, (q, g, w), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("on", ["q", "qg"])
@pytest.mark.parametrize("device, dtype", device_dtypes([torch.float64, torch.float32]))
def test_gradient_penalty_matches_the_reference(device, dtype, on, gen):
    # second-order gradients through the ops equal those through the reference's own autograd
    q = unit_maps(4, 8, 3, 2, dtype, gen, device)
    g = unit_maps(5, 8, 2, 3, dtype, gen, device)
    assert _well_separated(q, g)  # every device's argmax is the reference's
    w = torch.randn(12, generator=gen, dtype=torch.float64).to(device, torch.promote_types(dtype, torch.float32))
    got = _gradient_penalty(lambda a, c, v: qaconv_ext.qaconv_score(a, c, v, 0.5), q, g, w, on)
    got_match = _gradient_penalty(lambda a, c, v: qaconv_ext.qaconv_match(a, c) @ v.to(a.dtype), q, g, w, on)
    qr, gr, wr = (t.cpu().double() for t in (q, g, w))
    ref = _gradient_penalty(lambda a, c, v: reference.qaconv_match(a, c) @ v + 0.5, qr, gr, wr, on)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b, c in zip("qgw", got, got_match, ref):
        if on == "q" and name == "q":  # d(score)/dq does not depend on q itself (bilinear, fixed argmax)
            assert c.abs().max() == 0 and a.abs().max() == 0 and b.abs().max() == 0
            continue
        assert c.abs().max() > 0.1, name  # the input takes part in the penalty
        assert rel_err(a, c) <= tol and rel_err(b, c) <= tol, name


def test_opcheck(device, gen):
    q = unit_maps(3, 8, 3, 2, torch.float32, gen, device).requires_grad_()
    g = unit_maps(4, 8, 2, 3, torch.float32, gen, device).requires_grad_()
    w = torch.randn(12, generator=gen).to(device).requires_grad_()
    b = torch.tensor(0.5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.qaconv_ext.match.default, (q, g, True))
    torch.library.opcheck(torch.ops.qaconv_ext.match.default, (q.detach(), g.detach(), False))
    torch.library.opcheck(torch.ops.qaconv_ext.score.default, (q, g, w, b))
    torch.library.opcheck(torch.ops.qaconv_ext.score.default, (q, g, w, None))
    torch.library.opcheck(torch.ops.qaconv_ext.score.default, (q, g, w.detach()[None].requires_grad_(), b))
    values, indices = torch.ops.qaconv_ext.match(q.detach(), g.detach(), True)
    upstream = torch.randn(values.shape, generator=gen).to(device)
    torch.library.opcheck(torch.ops.qaconv_ext.match_backward.default, (upstream, indices, q.detach(), g.detach()))
    torch.library.opcheck(torch.ops.qaconv_ext.match_backward.default,
                          (upstream, indices, q.detach(), g.detach(), [True, False]))
    torch.library.opcheck(torch.ops.qaconv_ext.match_backward.default,
                          (upstream.requires_grad_(), indices, q, g))  # its own autograd


def test_torch_compile_fullgraph(device, gen):
    q = unit_maps(4, 8, 3, 2, torch.float32, gen, device)
    g = unit_maps(5, 8, 3, 2, torch.float32, gen, device)
    w = torch.randn(12, generator=gen).to(device)

    def head(a, b, weight):
        return torch.sigmoid(qaconv_ext.qaconv_score(a, b, weight, 0.5)) + qaconv_ext.qaconv_match(a, b).amax(-1)

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, g, w), head(q, g, w), atol=1e-6)
    qg = q.clone().requires_grad_()
    compiled(qg, g, w).sum().backward()
    qe = q.clone().requires_grad_()
    head(qe, g, w).sum().backward()
    assert torch.allclose(qg.grad, qe.grad, atol=1e-6)


# What each rule's error says (a part of the message) and its type: the README's "errors name the problem".
BAD_INPUT_ERRORS = {
    "query rank": ("ValueError", "query must be a 4-D feature map"),
    "gallery rank": ("ValueError", "gallery must be a 4-D feature map"),
    "dtypes differ": ("TypeError", "dtypes differ (torch.float32 vs torch.float64)"),
    "unsupported dtype": ("TypeError", "unsupported dtype torch.int32"),
    "channel mismatch": ("ValueError", "channel mismatch: query has 8 channels, gallery has 7"),
    "no channels": ("ValueError", "0 channels"),
    "empty query": ("ValueError", "query has an empty spatial size [0, 3]"),
    "empty gallery": ("ValueError", "gallery has an empty spatial size [3, 0]"),
    "weight dtype": ("TypeError", "weight must be floating point"),
    "weight length": ("ValueError", "Lq + Lg = 18 values (shape [18] or [1, 18]), got shape [17]"),
    "weight shape": ("ValueError", "got shape [2, 9]"),
    "bias size": ("ValueError", "bias must hold one value"),
    "grad_values shape": ("ValueError", "grad_values must be [P, N, Lq + Lg] = [2, 3, 18]"),
    "indices shape": ("ValueError", "indices must have the shape of grad_values"),
    "indices dtype": ("TypeError", "indices must be int64"),
    "backward pair": ("ValueError", "channel mismatch"),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA device")), "meta"])
def compiled_error_kind(kind: str, device: str) -> str:
    """The error type a rule raises on ``device``: the compiled kernels' stable ABI carries no TypeError,
    so there the dtype rules are ValueErrors (same messages); the fake kernels (meta) and the fallback
    raise TypeError."""
    return "ValueError" if kind == "TypeError" and qaconv_ext.native_available(device) and device != "meta" else kind


def test_bad_inputs_name_the_problem(device):
    # the compiled kernels check in C++, the fake kernels (meta) in Python: same messages, the same types
    # but for the dtype rules (compiled_error_kind)
    calls = bad_op_calls(device)
    assert set(calls) == set(BAD_INPUT_ERRORS)
    for case, call in calls.items():
        kind, text = BAD_INPUT_ERRORS[case]
        error = error_of(call)
        assert error is not None and error[0] == compiled_error_kind(kind, device) and text in error[1], (case, error)
        if device != "cpu":
            cpu_error = error_of(bad_op_calls("cpu")[case])
            assert error[1] == cpu_error[1], case


def test_public_api_errors():
    q, g = torch.zeros(2, 8, 3, 3), torch.zeros(3, 8, 3, 3)
    cases = [
        (lambda: qaconv_ext.qaconv_match(q[0], g), ValueError, "4-D"),
        (lambda: qaconv_ext.qaconv_match(q, torch.zeros(3, 7, 3, 3)), ValueError, "channel mismatch"),
        (lambda: qaconv_ext.qaconv_match(q, g.double()), TypeError, "dtypes differ"),
        (lambda: qaconv_ext.qaconv_match(q.int(), g.int()), TypeError, "unsupported dtype"),
        (lambda: qaconv_ext.qaconv_match(q, g.to("meta")), ValueError, r"different devices \(cpu vs meta\)"),
        (lambda: qaconv_ext.qaconv_match(q, torch.zeros(3, 8, 0, 3)), ValueError, "empty spatial"),
        (lambda: qaconv_ext.qaconv_match(q, [1, 2]), TypeError, "gallery must be a torch.Tensor"),
        (lambda: qaconv_ext.qaconv_score(q, g, [1.0] * 18), TypeError, "weight must be a torch.Tensor"),
        (lambda: qaconv_ext.qaconv_score(q, g, torch.ones(17)), ValueError, r"Lq \+ Lg = 18"),
        (lambda: qaconv_ext.qaconv_score(q, g, torch.ones(18), torch.ones(2)), ValueError, "bias"),
        (lambda: qaconv_ext.qaconv_score(q, g, torch.ones(18), "0.5x"), TypeError, "bias must be a number"),
        (lambda: qaconv_ext.qaconv_score(q, g, torch.ones(18, device="meta")), ValueError, "weight is on meta"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()
    with pytest.raises(RuntimeError, match="out of range"):
        values, indices = torch.ops.qaconv_ext.match(q, g, True)
        torch.ops.qaconv_ext.match_backward(torch.ones_like(values), indices + 100, q, g)


def test_raw_op_without_indices_refuses_backward(gen):
    q = unit_maps(2, 4, 2, 2, torch.float32, gen).requires_grad_()
    g = unit_maps(2, 4, 2, 2, torch.float32, gen)
    values, _ = torch.ops.qaconv_ext.match(q, g, False)
    with pytest.raises(RuntimeError, match="with_indices=False"):
        values.sum().backward()


def test_match_threads_agree(gen):
    q, g = unit_maps(9, 16, 6, 4, torch.float32, gen), unit_maps(50, 16, 6, 4, torch.float32, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = qaconv_ext.qaconv_match(q, g, return_indices=True)
        torch.set_num_threads(max(2, threads))
        many = qaconv_ext.qaconv_match(q, g, return_indices=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def _schema(name: str) -> str:
    return str(getattr(torch.ops.qaconv_ext, name).default._schema)


def test_fallback_schemas_are_the_compiled_ones():
    # the schema strings a build without the compiled module defines, parsed as the dispatcher does
    assert set(_library.SCHEMAS) == {"match", "score", "match_backward", "centroid_score", "centroid_score_u8"}
    for name, schema in _library.SCHEMAS.items():
        assert str(torch._C.parse_schema("qaconv_ext::" + schema)) == _schema(name), name


_WITHOUT_EXTENSION = r"""
import json, sys, warnings
sys.modules["qaconv_ext.ops._native"] = None  # the compiled libraries cannot be loaded
sys.path.insert(0, sys.argv[1])  # tests/, for helpers
import torch, qaconv_ext
from qaconv_ext import reference
from helpers import bad_op_calls, error_of
assert not qaconv_ext.native_available("cpu")
gen = torch.Generator().manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(3, 8, 3, 2, dtype=torch.float64, generator=gen), dim=1)
g = torch.nn.functional.normalize(torch.randn(4, 8, 2, 3, dtype=torch.float64, generator=gen), dim=1)
w = torch.randn(12, dtype=torch.float64, generator=gen)
q.requires_grad_()
g.requires_grad_()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    grads = torch.autograd.grad(qaconv_ext.qaconv_score(q, g, w, 0.1).sum(), (q, g))
    only_q = torch.autograd.grad(qaconv_ext.qaconv_match(q, g.detach()).sum(), q)
    errors = {case: error_of(call) for case, call in bad_op_calls("cpu").items()}
assert any("chunked PyTorch path" in str(c.message) for c in caught)
ref = torch.autograd.grad((reference.qaconv_match(q, g) @ w).sum(), (q, g))
ref_q = torch.autograd.grad(reference.qaconv_match(q, g).sum(), q)
for a, b in zip(grads + only_q, ref + ref_q):
    assert (a - b).abs().max() < 1e-12
schemas = {name: str(getattr(torch.ops.qaconv_ext, name).default._schema)
           for name in ("match", "score", "match_backward", "centroid_score", "centroid_score_u8")}
from helpers import centroid_problem
from qaconv_ext.ops import centroid_score, quantize_centroid_table
table, codes, cw = centroid_problem()
centroid = {"float32": centroid_score(table, codes, cw, 0.5).tolist(),
            "uint8": centroid_score(quantize_centroid_table(table), codes, cw, 0.5).tolist()}
print(json.dumps({"schemas": schemas, "errors": errors, "centroid": centroid}))
"""


def test_package_works_without_the_compiled_extension():
    # a build without the C++ module still registers the ops (chunked PyTorch path), warns once, and
    # has the compiled build's schemas and input checks
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION, tests_dir], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["schemas"] == {name: _schema(name) for name in ("match", "score", "match_backward", "centroid_score",
                                                                  "centroid_score_u8")}
    # the centroid scores' fallbacks give the compiled kernels' scores
    from helpers import centroid_problem
    from qaconv_ext.ops import centroid_score, quantize_centroid_table

    table, codes, cw = centroid_problem()
    for name, t in (("float32", table), ("uint8", quantize_centroid_table(table))):
        torch.testing.assert_close(torch.tensor(report["centroid"][name]), centroid_score(t, codes, cw, 0.5),
                                   rtol=1e-5, atol=1e-5)
    compiled = {case: error_of(call) for case, call in bad_op_calls("cpu").items()}
    # the compiled kernels' messages, with the Python error types (TypeError for the dtype rules)
    assert report["errors"] == {case: [BAD_INPUT_ERRORS[case][0], message] for case, (_, message) in compiled.items()}
