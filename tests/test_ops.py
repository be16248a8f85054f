"""The fused matching ops against the float64 chunked reference, on fresh random inputs."""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

import qaconv_ext
from qaconv_ext import reference
from conftest import rel_err, score_err, unit_maps

TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Spatial sizes (hq, wq, hg, wg): typical 24x8, odd 7x5, and query/gallery of different sizes.
SHAPES = [(24, 8, 24, 8), (7, 5, 7, 5), (7, 5, 3, 6)]
BATCHES = [(1, 1), (7, 33), (33, 7)]


def test_native_kernel_is_built():
    assert qaconv_ext.native_available("cpu"), "the C++ extension is not built; run `make setup`"


def _idx_ok(query, gallery, values, indices, tol):
    """Reference S at the returned index is within tol of the reference maximum, in both directions."""
    S = reference.similarity(query.double(), gallery.double())  # [P, N, Lq, Lg]
    Lq = S.shape[2]
    at_row = torch.gather(S, 3, indices[..., :Lq].unsqueeze(-1)).squeeze(-1)
    at_col = torch.gather(S, 2, indices[..., Lq:].unsqueeze(2)).squeeze(2)
    best_row, best_col = S.amax(3), S.amax(2)
    return (at_row - best_row).abs().max().item() <= tol and (at_col - best_col).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_match_values_and_indices(dtype, shape, gen):
    hq, wq, hg, wg = shape
    for P, N in BATCHES:
        q = unit_maps(P, 16, hq, wq, dtype, gen)
        g = unit_maps(N, 16, hg, wg, dtype, gen)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        ref = reference.qaconv_match(q.double(), g.double())
        assert values.shape == (P, N, hq * wq + hg * wg) and values.dtype == dtype
        assert indices.dtype == torch.long
        assert rel_err(values, ref) <= TOL[dtype], (dtype, shape, P, N, gen.initial_seed())
        # Index checks use the inputs as the kernel saw them (rounded to dtype), in float64.
        assert _idx_ok(q, g, values, indices, 4 * TOL[dtype] + 1e-12), (dtype, shape, gen.initial_seed())
        assert torch.equal(qaconv_ext.qaconv_match(q, g), values)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_score_matches_reference(dtype, gen):
    for (hq, wq, hg, wg), (P, N) in itertools.product(SHAPES, BATCHES):
        q = unit_maps(P, 24, hq, wq, dtype, gen)
        g = unit_maps(N, 24, hg, wg, dtype, gen)
        w = torch.randn(hq * wq + hg * wg, generator=gen)
        for bias in (None, 0.25, torch.tensor([-1.5])):
            out = qaconv_ext.qaconv_score(q, g, w, bias)
            assert out.shape == (P, N)
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert score_err(out, q, g, w, bias) <= max(TOL[dtype], 1e-6), (dtype, P, N, gen.initial_seed())


def test_channels_last_and_noncontiguous_inputs(gen):
    q = unit_maps(5, 32, 24, 8, torch.float32, gen)
    g = unit_maps(9, 32, 24, 8, torch.float32, gen)
    ref = reference.qaconv_match(q.double(), g.double())
    out = qaconv_ext.qaconv_match(q.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last))
    assert rel_err(out, ref) <= 1e-6
    wide = torch.cat([g, g], dim=1)[:, :32]  # a non-contiguous view with the same values
    assert not wide.is_contiguous()
    assert rel_err(qaconv_ext.qaconv_match(q, wide), ref) <= 1e-6
    swapped = q.transpose(2, 3).contiguous().transpose(2, 3)  # strides of neither standard layout
    assert rel_err(qaconv_ext.qaconv_match(swapped, g), ref) <= 1e-6


def test_ties_resolve_to_smallest_index(gen):
    # Repeated locations create exact ties; the op must agree with torch.max (first occurrence).
    base = unit_maps(3, 8, 2, 2, torch.float64, gen)
    q = base.repeat(1, 1, 2, 3)  # every location appears several times
    g = unit_maps(4, 8, 2, 2, torch.float64, gen).repeat(1, 1, 3, 1)
    _, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    _, ref_idx = reference.qaconv_match(q, g, return_indices=True)
    assert torch.equal(indices, ref_idx)


def test_unwritten_outputs_would_show(gen):
    # With deterministic mode PyTorch fills fresh allocations with NaN: every element must be written.
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


def test_empty_batches_give_empty_results():
    q = torch.randn(0, 8, 3, 3)
    g = torch.randn(5, 8, 3, 3)
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    assert values.shape == (0, 5, 18) and indices.shape == (0, 5, 18)
    assert qaconv_ext.qaconv_score(g, q, torch.ones(18)).shape == (5, 0)


def test_nan_propagates_like_torch_max(gen):
    q = unit_maps(3, 8, 3, 2, torch.float32, gen)
    g = unit_maps(4, 8, 2, 2, torch.float32, gen)
    q[1, :, 2, 1] = float("nan")  # query 1, location s = 5
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    ref_v, ref_i = reference.qaconv_match(q, g, return_indices=True)
    assert torch.isnan(values[1, :, 5]).all()  # its own row maxima
    assert torch.isnan(values[1, :, 6:]).all()  # every gallery location sees the NaN row
    assert (indices[1, :, 6:] == 5).all()  # ... and points at it
    assert torch.isfinite(values[[0, 2]]).all() and torch.isfinite(values[1, :, :5]).all()
    assert torch.allclose(values.nan_to_num(7.0), ref_v.nan_to_num(7.0), atol=1e-6)
    assert torch.equal(indices[1, :, 6:], ref_i[1, :, 6:])
    assert torch.isnan(qaconv_ext.qaconv_score(q, g, torch.ones(10))[1]).all()


@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (7, 5, 4, 5)])  # Lg = 4 and 20: below / across 16 lanes
def test_values_only_path_with_nan_and_inf(shape, gen):
    # score and values-only match take a fast path for finite blocks; blocks with NaN or inf fall back
    hq, wq, hg, wg = shape
    q = unit_maps(3, 8, hq, wq, torch.float32, gen)
    g = unit_maps(5, 8, hg, wg, torch.float32, gen)
    q[1, :, 0, 1] = float("nan")
    g[2, 0, 1, 0] = float("inf")
    g[3, 1, 0, 0] = -float("inf")
    ref = reference.qaconv_match(q.double(), g.double())
    for values in (qaconv_ext.qaconv_match(q, g), qaconv_ext.qaconv_match(q, g, return_indices=True)[0]):
        assert torch.equal(torch.isnan(values), torch.isnan(ref)) and torch.equal(torch.isinf(values), torch.isinf(ref))
        finite = torch.isfinite(ref)
        assert torch.allclose(values[finite].double(), ref[finite], atol=1e-6)
        assert torch.equal(values[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)].float())
    w = torch.rand(hq * wq + hg * wg, generator=gen)
    score, ref_score = qaconv_ext.qaconv_score(q, g, w), reference.qaconv_score(q.double(), g.double(), w.double())
    assert torch.equal(torch.isnan(score), torch.isnan(ref_score))
    assert torch.equal(score[torch.isinf(ref_score)], ref_score[torch.isinf(ref_score)].float())
    ok = torch.isfinite(ref_score)
    assert torch.allclose(score[ok].double(), ref_score[ok], atol=1e-5)


def test_infinities_are_ordinary_values():
    q = torch.zeros(1, 1, 1, 3)
    g = torch.zeros(1, 1, 1, 2)
    q[0, 0, 0] = torch.tensor([1.0, -1.0, 2.0])
    g[0, 0, 0] = torch.tensor([float("inf"), 1.0])
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    ref_v, ref_i = reference.qaconv_match(q, g, return_indices=True)
    assert torch.equal(values, ref_v) and torch.equal(indices, ref_i)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_match_gradients_against_reference_autograd(dtype, gen):
    q = unit_maps(7, 16, 7, 5, dtype, gen).requires_grad_()
    g = unit_maps(5, 16, 3, 6, dtype, gen).requires_grad_()
    upstream = torch.randn(7, 5, 35 + 18, generator=gen, dtype=torch.float64)
    values = qaconv_ext.qaconv_match(q, g)
    dq, dg = torch.autograd.grad(values, (q, g), upstream.to(dtype))
    qr, gr = q.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    rdq, rdg = torch.autograd.grad(reference.qaconv_match(qr, gr), (qr, gr), upstream)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert dq.dtype == dtype and dg.dtype == dtype
    assert rel_err(dq, rdq) <= tol and rel_err(dg, rdg) <= tol, gen.initial_seed()


@pytest.mark.parametrize("mask", [(True, False), (False, True), (False, False)])
def test_backward_output_mask(mask, gen):
    # the gradients asked for are the full ones; the others are empty [0] tensors, not computed
    q = unit_maps(6, 16, 7, 5, torch.float32, gen)
    g = unit_maps(9, 16, 3, 6, torch.float32, gen)
    values, indices = torch.ops.qaconv_ext.match(q, g, True)
    upstream = torch.randn(values.shape, generator=gen)
    full = reference.match_backward(upstream.double(), indices, q.double(), g.double())
    got = torch.ops.qaconv_ext.match_backward(upstream, indices, q, g, list(mask))
    ref = reference.match_backward(upstream.double(), indices, q.double(), g.double(), output_mask=mask)
    for need, out, r, f, like in zip(mask, got, ref, full, (q, g)):
        if need:
            assert out.shape == like.shape and rel_err(out, f) <= 1e-6 and torch.equal(r, f)
        else:
            assert out.shape == (0,) and r.shape == (0,)


def test_autograd_skips_the_gallery_gradient(gen, monkeypatch):
    # the class memory of training is a gallery without gradient: its half of the backward is not run
    q = unit_maps(4, 8, 3, 2, torch.float32, gen).requires_grad_()
    g = unit_maps(5, 8, 3, 2, torch.float32, gen)
    w = torch.randn(12, generator=gen)
    masks = []
    real = torch.ops.qaconv_ext.match_backward

    def spy(*args):
        masks.append(tuple(args[4]))
        return real(*args)

    monkeypatch.setattr(torch.ops.qaconv_ext, "match_backward", spy)
    qaconv_ext.qaconv_match(q, g).sum().backward()
    qaconv_ext.qaconv_score(q, g, w, 0.0).sum().backward()
    assert masks == [(True, False), (True, False)]
    qr = q.detach().double().requires_grad_()
    (reference.qaconv_match(qr, g.double()).sum() + reference.qaconv_score(qr, g.double(), w.double())
     .sum()).backward()
    assert rel_err(q.grad, qr.grad) <= 1e-6


def test_score_gradients_against_reference_autograd(gen):
    q = unit_maps(6, 12, 4, 3, torch.float64, gen).requires_grad_()
    g = unit_maps(9, 12, 4, 3, torch.float64, gen).requires_grad_()
    w = torch.randn(24, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(qaconv_ext.qaconv_score(q, g, w, b), (q, g, w, b), upstream)
    ref = torch.autograd.grad(reference.qaconv_match(q, g) @ w + b, (q, g, w, b), upstream)
    for got, want in zip(grads, ref):
        assert got.shape == want.shape and rel_err(got, want) <= 1e-12


def test_gradcheck_float64(gen):
    q = unit_maps(2, 3, 2, 2, torch.float64, gen).requires_grad_()
    g = unit_maps(3, 3, 1, 3, torch.float64, gen).requires_grad_()
    w = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: qaconv_ext.qaconv_match(a, b), (q, g))
    assert torch.autograd.gradcheck(lambda a, b, c: qaconv_ext.qaconv_score(a, b, c, 0.1), (q, g, w))


def test_opcheck(gen):
    q = unit_maps(3, 8, 3, 2, torch.float32, gen).requires_grad_()
    g = unit_maps(4, 8, 2, 3, torch.float32, gen).requires_grad_()
    w = torch.randn(12, generator=gen, requires_grad=True)
    b = torch.tensor(0.5, requires_grad=True)
    torch.library.opcheck(torch.ops.qaconv_ext.match.default, (q, g, True))
    torch.library.opcheck(torch.ops.qaconv_ext.match.default, (q.detach(), g.detach(), False))
    torch.library.opcheck(torch.ops.qaconv_ext.score.default, (q, g, w, b))
    torch.library.opcheck(torch.ops.qaconv_ext.score.default, (q, g, w, None))
    values, indices = torch.ops.qaconv_ext.match(q.detach(), g.detach(), True)
    torch.library.opcheck(torch.ops.qaconv_ext.match_backward.default,
                          (torch.randn_like(values), indices, q.detach(), g.detach()))
    torch.library.opcheck(torch.ops.qaconv_ext.match_backward.default,
                          (torch.randn_like(values), indices, q.detach(), g.detach(), [True, False]))


def test_torch_compile_fullgraph(gen):
    q = unit_maps(4, 8, 3, 2, torch.float32, gen)
    g = unit_maps(5, 8, 3, 2, torch.float32, gen)
    w = torch.randn(12, generator=gen)

    def head(a, b, weight):
        return torch.sigmoid(qaconv_ext.qaconv_score(a, b, weight, 0.5)) + qaconv_ext.qaconv_match(a, b).amax(-1)

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, g, w), head(q, g, w), atol=1e-6)
    qg = q.clone().requires_grad_()
    compiled(qg, g, w).sum().backward()
    qe = q.clone().requires_grad_()
    head(qe, g, w).sum().backward()
    assert torch.allclose(qg.grad, qe.grad, atol=1e-6)


def test_bad_inputs_name_the_problem():
    q, g = torch.randn(2, 8, 3, 3), torch.randn(3, 8, 3, 3)
    cases = [
        (lambda: qaconv_ext.qaconv_match(q[0], g), ValueError, "4-D"),
        (lambda: qaconv_ext.qaconv_match(q, torch.randn(3, 7, 3, 3)), ValueError, "channel mismatch"),
        (lambda: qaconv_ext.qaconv_match(q, g.double()), TypeError, "dtypes differ"),
        (lambda: qaconv_ext.qaconv_match(q.int(), g.int()), TypeError, "unsupported dtype"),
        (lambda: qaconv_ext.qaconv_match(q, g.to("meta")), ValueError, "different devices"),
        (lambda: qaconv_ext.qaconv_match(q, torch.randn(3, 8, 0, 3)), ValueError, "empty spatial"),
        (lambda: qaconv_ext.qaconv_match(q, [1, 2]), TypeError, "torch.Tensor"),
        (lambda: qaconv_ext.qaconv_score(q, g, torch.ones(17)), ValueError, r"Lq \+ Lg = 18"),
        (lambda: qaconv_ext.qaconv_score(q, g, torch.ones(18), torch.ones(2)), ValueError, "bias"),
    ]
    for call, exc, text in cases:
        with pytest.raises(exc, match=text):
            call()
    # The dispatcher op checks too, for callers that skip the Python API.
    with pytest.raises(RuntimeError, match="channel mismatch"):
        torch.ops.qaconv_ext.match(q, torch.randn(3, 7, 3, 3), False)
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


_WITHOUT_EXTENSION = r"""
import sys, warnings
sys.modules["qaconv_ext._C"] = None  # the compiled module cannot be imported
import torch, qaconv_ext
from qaconv_ext import reference
assert not qaconv_ext.native_available("cpu")
q = torch.nn.functional.normalize(torch.randn(3, 8, 3, 2, dtype=torch.float64), dim=1).requires_grad_()
g = torch.nn.functional.normalize(torch.randn(4, 8, 2, 3, dtype=torch.float64), dim=1).requires_grad_()
w = torch.randn(12, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    grads = torch.autograd.grad(qaconv_ext.qaconv_score(q, g, w, 0.1).sum(), (q, g))
    only_q = torch.autograd.grad(qaconv_ext.qaconv_match(q, g.detach()).sum(), q)
assert any("chunked PyTorch path" in str(c.message) for c in caught)
ref = torch.autograd.grad((reference.qaconv_match(q, g) @ w).sum(), (q, g))
ref_q = torch.autograd.grad(reference.qaconv_match(q, g).sum(), q)
for a, b in zip(grads + only_q, ref + ref_q):
    assert (a - b).abs().max() < 1e-12
print("fallback ok")
"""


def test_package_works_without_the_compiled_extension():
    # a build without the C++ module still registers the ops (chunked PyTorch path) and warns once
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr
