"""The CUDA kernels against the float64 reference on fresh random inputs (skipped without a GPU).

Shapes cross the kernels' tiles on purpose: 64 x 64 similarity tiles and 16-channel chunks of the
CUDA-core kernels, 48 x 64 warp tiles, k = 16 steps and 8-channel copies of the tensor-core score
kernel, warps of 32 locations in the backward. L = 35, 143 and 192; d = 16, 24, 40 and 130; P, N never
only multiples of a tile. qaconv_score is checked on both kernels (QACONV_EXT_CUDA_KERNEL=simple
selects the CUDA-core one).
"""
from __future__ import annotations

import pytest
import torch

import qaconv_ext
from qaconv_ext import reference
from conftest import rel_err, score_err, unit_maps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (hq, wq, hg, wg, d)
SHAPES = [(7, 5, 7, 5, 16), (13, 11, 24, 8, 40), (24, 8, 24, 8, 130), (7, 5, 3, 6, 24)]
BATCHES = [(1, 1), (7, 33), (33, 7)]


def _pair(P, N, shape, dtype, gen):
    hq, wq, hg, wg, d = shape
    return unit_maps(P, d, hq, wq, dtype, gen, "cuda"), unit_maps(N, d, hg, wg, dtype, gen, "cuda")


def test_cuda_kernel_is_built():
    assert qaconv_ext.native_available("cuda"), "qaconv_ext was built without CUDA; rebuild on this machine"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_match_values_and_indices(dtype, shape, gen):
    for P, N in BATCHES:
        q, g = _pair(P, N, shape, dtype, gen)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        assert values.is_cuda and values.dtype == dtype and indices.dtype == torch.long
        S = reference.similarity(q.double().cpu(), g.double().cpu())  # inputs as the kernel saw them
        Lq = S.shape[2]
        ref = torch.cat([S.amax(3), S.amax(2)], dim=2)
        assert rel_err(values.cpu(), ref) <= TOL[dtype], (dtype, shape, P, N, gen.initial_seed())
        idx = indices.cpu()
        at_row = torch.gather(S, 3, idx[..., :Lq].unsqueeze(-1)).squeeze(-1)
        at_col = torch.gather(S, 2, idx[..., Lq:].unsqueeze(2)).squeeze(2)
        tol = 4 * TOL[dtype] if dtype != torch.float32 else 1e-5
        assert (at_row - S.amax(3)).abs().max() <= tol and (at_col - S.amax(2)).abs().max() <= tol
        assert torch.equal(qaconv_ext.qaconv_match(q, g), values)  # values-only kernel agrees


@pytest.fixture(params=["auto", "simple"])
def kernel(request, monkeypatch):
    """Run a score test on the tensor-core kernel (auto) and on the CUDA-core kernel (simple)."""
    if request.param == "simple":
        monkeypatch.setenv("QACONV_EXT_CUDA_KERNEL", "simple")
    else:
        monkeypatch.delenv("QACONV_EXT_CUDA_KERNEL", raising=False)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_score_matches_reference(dtype, shape, kernel, gen):
    hq, wq, hg, wg, _ = shape
    for P, N in BATCHES:
        q, g = _pair(P, N, shape, dtype, gen)
        w = torch.randn(hq * wq + hg * wg, generator=gen)
        for bias in (None, torch.tensor([-1.5])):
            out = qaconv_ext.qaconv_score(q, g, w.cuda(), None if bias is None else bias.cuda())
            assert out.shape == (P, N) and out.dtype == torch.float32 and out.is_cuda
            err = score_err(out, q, g, w, bias)
            assert err <= max(TOL[dtype], 1e-6), (dtype, shape, P, N, kernel, gen.initial_seed())


@pytest.mark.parametrize("P, N", [(1, 130), (5, 200), (600, 150)])
def test_score_gallery_chunks(P, N, gen):
    """Many CTAs per query, and 64 gallery images streamed through one CTA's pipeline (L = 192, d = 128)."""
    q, g = _pair(P, N, (24, 8, 24, 8, 128), torch.bfloat16, gen)
    w = torch.randn(384, generator=gen)
    out = qaconv_ext.qaconv_score(q, g, w.cuda(), torch.tensor(0.25, device="cuda"))
    assert score_err(out, q, g, w, 0.25) <= TOL[torch.bfloat16], (P, N, gen.initial_seed())


@pytest.mark.parametrize("precision, tol", [("high", 2e-3), ("medium", 1e-2)])
def test_float32_staged_on_tensor_cores(precision, tol, gen):
    """float32 maps under "high" / "medium" matmul precision: staged in float16 / bfloat16."""
    q, g = _pair(7, 33, (24, 8, 13, 11, 40), torch.float32, gen)
    w = torch.randn(192 + 143, generator=gen)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        out = qaconv_ext.qaconv_score(q, g, w.cuda())
    finally:
        torch.set_float32_matmul_precision(before)
    err = score_err(out, q, g, w)
    assert err <= tol, (precision, err)
    assert err > 1e-7  # rounded inputs: not the exact float32 kernel


def test_agrees_with_cpu_kernel_on_channels_last(gen):
    q, g = _pair(9, 70, (24, 8, 24, 8, 128), torch.float32, gen)
    cl = dict(memory_format=torch.channels_last)
    gpu = qaconv_ext.qaconv_match(q.to(**cl), g.to(**cl))
    cpu = qaconv_ext.qaconv_match(q.cpu(), g.cpu())
    assert rel_err(gpu.cpu(), cpu) <= 1e-6


def test_ties_resolve_to_smallest_index(gen):
    # Small-integer features: every dot product is exact in float32, so ties are exact ties.
    base = torch.randint(-2, 3, (3, 8, 2, 2), generator=gen).float()
    q = base.repeat(1, 1, 2, 3)
    g = torch.randint(-2, 3, (4, 8, 2, 2), generator=gen).float().repeat(1, 1, 3, 1)
    _, indices = qaconv_ext.qaconv_match(q.cuda(), g.cuda(), return_indices=True)
    _, ref_idx = reference.qaconv_match(q.double(), g.double(), return_indices=True)
    assert torch.equal(indices.cpu(), ref_idx)


def test_every_output_is_written(gen):
    # Fill the caching allocator's blocks with NaN, free them, then allocate the outputs in them.
    poison = torch.full((64 * 1024 * 1024,), float("nan"), device="cuda")
    del poison
    q, g = _pair(33, 65, (7, 5, 13, 11, 40), torch.float16, gen)
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    score = qaconv_ext.qaconv_score(q, g, torch.ones(35 + 143, device="cuda"))
    assert torch.isfinite(values).all() and torch.isfinite(score).all()
    assert int(indices[..., :35].min()) >= 0 and int(indices[..., :35].max()) < 143
    assert int(indices[..., 35:].min()) >= 0 and int(indices[..., 35:].max()) < 35
    gq, gg = torch.ops.qaconv_ext.match_backward(torch.randn(values.shape, device="cuda"), indices, q, g)
    assert torch.isfinite(gq).all() and torch.isfinite(gg).all()


def test_nan_propagates_like_torch_max(gen):
    q, g = _pair(3, 4, (3, 2, 2, 2, 8), torch.float32, gen)
    q[1, :, 2, 1] = float("nan")  # query 1, location 5
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    assert torch.isnan(values[1, :, 5]).all() and torch.isnan(values[1, :, 6:]).all()
    assert (indices[1, :, 6:] == 5).all()
    assert torch.isfinite(values[[0, 2]]).all()
    assert torch.isnan(qaconv_ext.qaconv_score(q, g, torch.ones(10, device="cuda"))[1]).all()
    score16 = qaconv_ext.qaconv_score(q.half(), g.half(), torch.ones(10, device="cuda"))  # tensor cores
    assert torch.isnan(score16[1]).all() and torch.isfinite(score16[[0, 2]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_against_sparse_reference(dtype, gen):
    for shape in [(7, 5, 3, 6, 24), (13, 11, 24, 8, 130)]:
        q, g = _pair(7, 33, shape, dtype, gen)
        values, indices = torch.ops.qaconv_ext.match(q, g, True)
        upstream = torch.randn(values.shape, generator=gen, dtype=torch.float64)
        upstream[upstream.abs() < 0.3] = 0.0  # zeros are skipped by the kernel: cover that branch
        gq, gg = torch.ops.qaconv_ext.match_backward(upstream.to("cuda", torch.float32), indices, q, g)
        rq, rg = reference.match_backward(upstream, indices.cpu(), q.double().cpu(), g.double().cpu())
        assert gq.dtype == dtype and gq.shape == q.shape and gg.shape == g.shape
        tol = 1e-6 if dtype == torch.float32 else TOL[dtype]
        assert rel_err(gq.cpu(), rq) <= tol and rel_err(gg.cpu(), rg) <= tol, (dtype, shape, gen.initial_seed())
        again = torch.ops.qaconv_ext.match_backward(upstream.to("cuda", torch.float32), indices, q, g)
        assert torch.equal(again[0], gq) and torch.equal(again[1], gg)  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_against_reference_autograd(dtype, gen):
    q, g = _pair(7, 5, (7, 5, 3, 6, 16), dtype, gen)
    q.requires_grad_()
    g.requires_grad_()
    w = torch.randn(35 + 18, generator=gen, dtype=torch.float64)
    upstream = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    dq, dg = torch.autograd.grad(qaconv_ext.qaconv_score(q, g, w.float().cuda()), (q, g), upstream.float().cuda())
    qr, gr = q.detach().double().cpu().requires_grad_(), g.detach().double().cpu().requires_grad_()
    rdq, rdg = torch.autograd.grad(reference.qaconv_match(qr, gr) @ w, (qr, gr), upstream)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(dq.cpu(), rdq) <= tol and rel_err(dg.cpu(), rdg) <= tol, gen.initial_seed()


def test_opcheck_on_cuda(gen):
    q, g = _pair(3, 4, (3, 2, 2, 3, 8), torch.float32, gen)
    q.requires_grad_()
    g.requires_grad_()
    w = torch.randn(12, generator=gen, device="cpu").cuda().requires_grad_()
    b = torch.tensor(0.5, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.qaconv_ext.match.default, (q, g, True))
    torch.library.opcheck(torch.ops.qaconv_ext.match.default, (q.detach(), g.detach(), False))
    torch.library.opcheck(torch.ops.qaconv_ext.score.default, (q, g, w, b))
    values, indices = torch.ops.qaconv_ext.match(q.detach(), g.detach(), True)
    torch.library.opcheck(torch.ops.qaconv_ext.match_backward.default,
                          (torch.randn_like(values), indices, q.detach(), g.detach()))


def test_torch_compile_fullgraph(gen):
    q, g = _pair(4, 5, (3, 2, 3, 2, 8), torch.float32, gen)
    w = torch.randn(12, generator=gen).cuda()

    def head(a, b, weight):
        return torch.sigmoid(qaconv_ext.qaconv_score(a, b, weight, 0.5)) + qaconv_ext.qaconv_match(a, b).amax(-1)

    compiled = torch.compile(head, fullgraph=True)
    assert torch.allclose(compiled(q, g, w), head(q, g, w), atol=1e-6)


def test_cuda_errors_name_the_problem(gen):
    q, g = _pair(2, 3, (3, 3, 3, 3, 8), torch.float32, gen)
    with pytest.raises(RuntimeError, match="float64 is supported on the CPU"):
        torch.ops.qaconv_ext.match(q.double(), g.double(), False)
    with pytest.raises((RuntimeError, ValueError), match="different devices"):
        qaconv_ext.qaconv_match(q, g.cpu())
    big = torch.randn(1, 8, 40, 30, device="cuda")
    with pytest.raises(RuntimeError, match="at most 1024 locations"):
        torch.ops.qaconv_ext.match(big, big, False)
    values, indices = torch.ops.qaconv_ext.match(q, g, True)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.qaconv_ext.match_backward(torch.ones_like(values), indices + 100, q, g)
