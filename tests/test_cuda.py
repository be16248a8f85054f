"""Paths of the CUDA kernels beyond the op contract (skipped without a GPU; the contract itself runs
on every device present in test_ops.py).

Here: tile-crossing and large sizes, the tensor-core kernel's paths and precision modes, misaligned
bases, CUDA graphs, the poison test, the backward kernel, and limits of the CUDA kernels. Shapes
cross the kernels' tiles on purpose: 64 x 64 similarity tiles and 16-channel chunks of the CUDA-core
kernels, 48 x 64 warp tiles, k = 16 steps and 8-channel copies of the tensor-core score kernel, warps
of 32 locations in the backward. L = 35, 143 and 192; d = 16, 24, 40 and 130; P, N never only
multiples of a tile. qaconv_score is checked on both kernels (QACONV_EXT_CUDA_KERNEL=simple selects
the CUDA-core one).
"""
from __future__ import annotations

import pytest
import torch

import qaconv_ext
from helpers import NEEDS_CUDA, rel_err, score_err, unit_maps
from qaconv_ext import reference

pytestmark = NEEDS_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# (hq, wq, hg, wg, d)
SHAPES = [(7, 5, 7, 5, 16), (13, 11, 24, 8, 40), (24, 8, 24, 8, 130), (7, 5, 3, 6, 24)]
BATCHES = [(1, 1), (7, 33), (33, 7)]


def _pair(P, N, shape, dtype, gen):
    hq, wq, hg, wg, d = shape
    return unit_maps(P, d, hq, wq, dtype, gen, "cuda"), unit_maps(N, d, hg, wg, dtype, gen, "cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_match_across_tiles(dtype, shape, gen):
    for P, N in BATCHES:
        q, g = _pair(P, N, shape, dtype, gen)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        assert values.is_cuda and values.dtype == dtype and indices.dtype == torch.long
        S = reference.similarity(q.double().cpu(), g.double().cpu())  # inputs as the kernel saw them
        Lq = S.shape[2]
        ref = torch.cat([S.amax(3), S.amax(2)], dim=2)
        assert rel_err(values.cpu(), ref) <= TOL[dtype], (dtype, shape, P, N)
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
def test_score_across_tiles(dtype, shape, kernel, gen):
    hq, wq, hg, wg, _ = shape
    for P, N in BATCHES:
        q, g = _pair(P, N, shape, dtype, gen)
        w = torch.randn(hq * wq + hg * wg, generator=gen)
        for bias in (None, torch.tensor([-1.5])):
            out = qaconv_ext.qaconv_score(q, g, w.cuda(), None if bias is None else bias.cuda())
            assert out.shape == (P, N) and out.dtype == torch.float32 and out.is_cuda
            err = score_err(out, q, g, w, bias)
            assert err <= max(TOL[dtype], 1e-6), (dtype, shape, P, N, kernel)


@pytest.mark.parametrize("P, N", [(1, 130), (5, 200), (600, 150)])
def test_score_gallery_chunks(P, N, gen):
    """Many CTAs per query, and 64 gallery images streamed through one CTA's pipeline (L = 192, d = 128)."""
    q, g = _pair(P, N, (24, 8, 24, 8, 128), torch.bfloat16, gen)
    w = torch.randn(384, generator=gen)
    out = qaconv_ext.qaconv_score(q, g, w.cuda(), torch.tensor(0.25, device="cuda"))
    assert score_err(out, q, g, w, 0.25) <= TOL[torch.bfloat16], (P, N)


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


def _poison(*outputs):
    """Blocks of exactly the outputs' sizes, filled with NaN (or -1) and freed: the op's outputs, its first
    allocations, reuse them. Returns their addresses, to check that they did."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in outputs]
    for b in blocks:
        b.fill_(float("nan") if b.is_floating_point() else -1)
    ptrs = [b.data_ptr() for b in blocks]
    del blocks
    return ptrs


def test_every_output_is_written(gen, monkeypatch):
    P, N, Lq, Lg = 33, 65, 35, 143
    q, g = _pair(P, N, (7, 5, 13, 11, 40), torch.float16, gen)
    ptrs = _poison(((P, N, Lq + Lg), torch.float16), ((P, N, Lq + Lg), torch.long))
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    assert [values.data_ptr(), indices.data_ptr()] == ptrs, "outputs not in the poisoned blocks"
    assert torch.isfinite(values).all()
    assert int(indices[..., :Lq].min()) >= 0 and int(indices[..., :Lq].max()) < Lg
    assert int(indices[..., Lq:].min()) >= 0 and int(indices[..., Lq:].max()) < Lq
    w = torch.ones(Lq + Lg, device="cuda")  # allocated before the poison: the output is the next block
    for kernel in ("auto", "simple"):  # the tensor-core kernel, then the CUDA-core one
        if kernel == "simple":
            monkeypatch.setenv("QACONV_EXT_CUDA_KERNEL", "simple")
        ptrs = _poison(((P, N), torch.float32))
        score = qaconv_ext.qaconv_score(q, g, w)
        assert score.data_ptr() == ptrs[0] and torch.isfinite(score).all(), kernel
    upstream = torch.randn(values.shape, generator=gen).cuda()
    _poison(((P, Lq, 40), torch.float32), ((N, Lg, 40), torch.float32))  # its float32 accumulators
    gq, gg = torch.ops.qaconv_ext.match_backward(upstream, indices, q, g)
    assert torch.isfinite(gq).all() and torch.isfinite(gg).all()


# (P, N, (hq, wq, hg, wg, d)) reaching the tensor-core kernel's other code paths; which one runs depends
# on the device's shared memory (A100 164 KB, H100/H200 227 KB per block), the answer must not.
TC_PATHS = {
    "double buffer over many images, partial tiles": (600, 150, (13, 11, 24, 8, 40)),
    "double buffer over many images, small maps": (600, 150, (7, 5, 3, 6, 24)),
    "warps loop over 24 warp tiles": (9, 70, (16, 16, 16, 16, 16)),
    "one gallery buffer (H100) or fallback (A100)": (9, 70, (24, 8, 24, 8, 256)),
    "does not fit: CUDA-core fallback": (5, 20, (24, 8, 24, 8, 512)),
    "larger maps: CUDA-core fallback": (3, 10, (24, 16, 24, 16, 128)),
    "3 channels, padded to 8": (9, 70, (7, 5, 3, 6, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(TC_PATHS))
def test_score_tensor_core_paths(case, dtype, gen):
    P, N, shape = TC_PATHS[case]
    hq, wq, hg, wg, _ = shape
    q, g = _pair(P, N, shape, dtype, gen)
    w = torch.randn(hq * wq + hg * wg, generator=gen)
    out = qaconv_ext.qaconv_score(q, g, w.cuda(), torch.tensor([0.5], device="cuda"))
    assert score_err(out, q, g, w, torch.tensor([0.5])) <= TOL[dtype], (case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_on_misaligned_and_channels_last_maps(dtype, kernel, gen):
    q, g = _pair(7, 33, (7, 5, 13, 11, 24), dtype, gen)
    w = torch.randn(35 + 143, generator=gen)
    # storage offset of one element: the bases are no longer 16-byte aligned
    q_off = torch.empty(q.numel() + 1, dtype=dtype, device="cuda")[1:].view(q.shape).copy_(q)
    g_off = torch.empty(g.numel() + 1, dtype=dtype, device="cuda")[1:].view(g.shape).copy_(g)
    cl = dict(memory_format=torch.channels_last)
    for a, b in [(q_off, g_off), (q.to(**cl), g.to(**cl)), (q[:, :, :, :], g.transpose(2, 3).transpose(2, 3))]:
        out = qaconv_ext.qaconv_score(a, b, w.cuda())
        assert score_err(out, q, g, w) <= max(TOL[dtype], 1e-6), (dtype, kernel)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_with_infinities(dtype, kernel, gen):
    q, g = _pair(3, 4, (3, 2, 2, 2, 16), dtype, gen)
    q[1, 0] = float("inf")  # every location of query 1: +inf * positive, -inf * negative entries
    out = qaconv_ext.qaconv_score(q, g, torch.ones(10, device="cuda"))
    ref = reference.qaconv_score(q.double().cpu(), g.double().cpu(), torch.ones(10, dtype=torch.float64))
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref)) and torch.equal(torch.isinf(out.cpu()),
                                                                                   torch.isinf(ref))
    rest = [0, 2]
    assert score_err(out[rest], q[rest], g, torch.ones(10)) <= max(TOL[dtype], 1e-6)


def test_float32_high_precision_keeps_large_values_finite(gen):
    """Values beyond float16's range: "high" stages them in bfloat16 instead of overflowing to inf."""
    q, g = _pair(5, 9, (7, 5, 7, 5, 16), torch.float32, gen)
    q, g = q * 1e5, g * 3e4
    w = torch.randn(70, generator=gen)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        out = qaconv_ext.qaconv_score(q, g, w.cuda())
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.isfinite(out).all()
    assert score_err(out, q, g, w) <= 1e-2


def test_score_captured_in_a_cuda_graph(gen):
    """Launches go to the current stream (a launch elsewhere fails the capture) and need no host sync."""
    q, g = _pair(7, 33, (24, 8, 24, 8, 128), torch.float16, gen)
    w = torch.randn(384, generator=gen).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture
            qaconv_ext.qaconv_score(q, g, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qaconv_ext.qaconv_score(q, g, w)
    q2, g2 = _pair(7, 33, (24, 8, 24, 8, 128), torch.float16, gen)
    q.copy_(q2)
    g.copy_(g2)
    graph.replay()
    torch.cuda.synchronize()
    assert score_err(out, q2, g2, w.cpu()) <= TOL[torch.float16]


def test_nan_on_tensor_cores(gen):
    q, g = _pair(3, 4, (3, 2, 2, 2, 8), torch.float16, gen)
    q[1, :, 2, 1] = float("nan")  # query 1, location 5
    score16 = qaconv_ext.qaconv_score(q, g, torch.ones(10, device="cuda"))  # the tensor-core kernel
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
        assert rel_err(gq.cpu(), rq) <= tol and rel_err(gg.cpu(), rg) <= tol, (dtype, shape)
        again = torch.ops.qaconv_ext.match_backward(upstream.to("cuda", torch.float32), indices, q, g)
        assert torch.equal(again[0], gq) and torch.equal(again[1], gg)  # deterministic
        only_q, none_g = torch.ops.qaconv_ext.match_backward(upstream.to("cuda", torch.float32), indices, q, g,
                                                             [True, False])
        none_q, only_g = torch.ops.qaconv_ext.match_backward(upstream.to("cuda", torch.float32), indices, q, g,
                                                             [False, True])
        assert torch.equal(only_q, gq) and torch.equal(only_g, gg)
        assert none_g.shape == (0,) and none_q.shape == (0,)


def test_cuda_errors_name_the_problem(gen):
    q, g = _pair(2, 3, (3, 3, 3, 3, 8), torch.float32, gen)
    with pytest.raises(TypeError, match="float64 is supported on the CPU only"):
        torch.ops.qaconv_ext.match(q.double(), g.double(), False)
    with pytest.raises(ValueError, match=r"different devices \(cuda:0 vs cpu\)"):
        qaconv_ext.qaconv_match(q, g.cpu())
    values, indices = torch.ops.qaconv_ext.match(q, g, True)
    with pytest.raises(ValueError, match="grad_values is on cpu, features on cuda:0"):
        torch.ops.qaconv_ext.match_backward(values.cpu(), indices.cpu(), q, g)
    big = torch.zeros(1, 8, 40, 30, device="cuda")
    with pytest.raises(RuntimeError, match="at most 1024 locations"):
        torch.ops.qaconv_ext.match(big, big, False)
    values, indices = torch.ops.qaconv_ext.match(q, g, True)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.qaconv_ext.match_backward(torch.ones_like(values), indices + 100, q, g)
