"""The CPU kernel's own properties: composition independence, variants, shapes off its tiles, reduced dtypes.

* A pair's values and score are bit-identical whatever batch it is scored in (other queries, other
  gallery images, its position in a gallery block, the number of threads) and whichever micro-kernel
  variant runs (each similarity is one FMA chain over the channels in order; gemm_tile.h). Streaming
  top-k, sparse re-ranking and sharded evaluation compare with the dense result exactly and rely on it.
* Every variant against the float64 reference on shapes that are no multiple of the register tile
  (4 query locations x 24 or 48 gallery columns), of the 16 epilogue lanes or of the 128-channel passes.
* bfloat16 / float16 maps are read in their own dtype (widened while packing), accumulated in float32.
"""
from __future__ import annotations

import os

import pytest
import torch

import qaconv_ext
from helpers import rel_err, score_err, unit_maps
from qaconv_ext import reference
from qaconv_ext.ops import _library

pytestmark = pytest.mark.skipif(not _library.NATIVE, reason="the compiled CPU kernels are not built")

# Tolerances of the op contract tests (tests/test_ops.py) and of the CUDA bf16/fp16 paths.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
REDUCED = [torch.float32, torch.bfloat16, torch.float16]


def _variants():
    """The micro-kernel variants this processor runs (the portable ones always)."""
    names = ["generic", "generic16"]
    for name in ("avx2", "avx512"):
        old = os.environ.get("QACONV_CPU_KERNEL")
        try:
            os.environ["QACONV_CPU_KERNEL"] = name
            qaconv_ext.cpu_kernel()
            names.append(name)
        except ValueError:
            pass
        finally:
            if old is None:
                os.environ.pop("QACONV_CPU_KERNEL", None)
            else:
                os.environ["QACONV_CPU_KERNEL"] = old
    return names


VARIANTS = _variants()


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _ops(q, g, w):
    values = qaconv_ext.qaconv_match(q, g)
    values_idx, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    return values, values_idx, indices, qaconv_ext.qaconv_score(q, g, w, 0.5)


def test_unknown_or_unsupported_variant_is_refused(monkeypatch):
    monkeypatch.setenv("QACONV_CPU_KERNEL", "nope")
    with pytest.raises(ValueError, match="QACONV_CPU_KERNEL=nope"):
        qaconv_ext.cpu_kernel()
    with pytest.raises(RuntimeError, match="QACONV_CPU_KERNEL=nope"):
        qaconv_ext.qaconv_score(torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1, 1), torch.ones(2))
    monkeypatch.delenv("QACONV_CPU_KERNEL")
    assert qaconv_ext.cpu_kernel() in VARIANTS


# (hq, wq, hg, wg, d): tiny maps (the small-map epilogue), maps crossing the 16 epilogue lanes, d across
# the 128-channel passes, and typical 12x4 maps.
COMPOSITION_SHAPES = [(2, 2, 2, 2, 16), (3, 1, 1, 3, 3), (7, 5, 3, 6, 17), (1, 5, 17, 1, 130), (12, 4, 12, 4, 64)]


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("shape", COMPOSITION_SHAPES)
def test_pair_results_do_not_depend_on_the_batch(dtype, shape, gen, threads):
    hq, wq, hg, wg, d = shape
    P, N = 9, 61
    q = unit_maps(P, d, hq, wq, dtype, gen)
    g = unit_maps(N, d, hg, wg, dtype, gen)
    w = torch.randn(hq * wq + hg * wg, generator=gen)
    torch.set_num_threads(2)
    full = _ops(q, g, w)
    assert torch.equal(full[0], full[1])  # values with and without indices
    perm = torch.randperm(N, generator=gen)
    others = unit_maps(23, d, hg, wg, dtype, gen)
    for nthreads in (1, 2):
        torch.set_num_threads(nthreads)
        # one query at a time, odd query slices
        for p0, p1 in [(0, 1), (4, 5), (1, 8)]:
            part = _ops(q[p0:p1], g, w)
            for a, b in zip(part, full):
                assert torch.equal(a, b[p0:p1]), (nthreads, p0, p1)
        # gallery chunks of odd sizes, one image alone, a permuted gallery, a gallery among other images
        for n0, n1 in [(0, 1), (5, 6), (3, 10), (7, 61)]:
            part = _ops(q, g[n0:n1], w)
            for a, b in zip(part, full):
                assert torch.equal(a, b[:, n0:n1]), (nthreads, n0, n1)
        for a, b in zip(_ops(q, g[perm], w), full):
            assert torch.equal(a, b[:, perm])
        mixed = torch.cat([others[:11], g, others[11:]])
        for a, b in zip(_ops(q, mixed, w), full):
            assert torch.equal(a[:, 11:11 + N], b)
        # another memory layout of the same values
        cl = _ops(q.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last), w)
        for a, b in zip(cl, full):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 2, 2, 2, 16), (7, 5, 3, 6, 17), (3, 4, 2, 9, 131)])
def test_variants_give_identical_bits(shape, gen, monkeypatch):
    # the portable variants (std::fma) and the x86 ones (FMA instructions) round identically
    hq, wq, hg, wg, d = shape
    q = unit_maps(5, d, hq, wq, torch.float32, gen)
    g = unit_maps(13, d, hg, wg, torch.float32, gen)
    w = torch.randn(hq * wq + hg * wg, generator=gen)
    results = {}
    for name in VARIANTS:
        monkeypatch.setenv("QACONV_CPU_KERNEL", name)
        assert qaconv_ext.cpu_kernel() == name
        results[name] = _ops(q, g, w)
    first = results[VARIANTS[0]]
    for name, res in results.items():
        for a, b in zip(res, first):
            assert torch.equal(a, b), name


# Shapes off every tile: Lg = 1, 3, 5, 17; Lq = 1, 3, 5, 7; d = 1, 3, 17, 129; N = 1, 7, 26.
OFF_TILE = [(1, 1, 1, 1, 1, 1, 1), (1, 3, 1, 3, 1, 3, 7), (3, 5, 5, 1, 17, 2, 26), (7, 1, 17, 1, 3, 3, 7),
            (5, 1, 1, 5, 129, 2, 7), (2, 2, 1, 17, 17, 4, 1)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", REDUCED)
def test_off_tile_shapes_against_reference(variant, dtype, gen, monkeypatch):
    monkeypatch.setenv("QACONV_CPU_KERNEL", variant)
    for hq, wq, hg, wg, d, P, N in OFF_TILE:
        q = unit_maps(P, d, hq, wq, dtype, gen)
        g = unit_maps(N, d, hg, wg, dtype, gen)
        w = torch.randn(hq * wq + hg * wg, generator=gen)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        # the reference on the maps as the kernel saw them (rounded to dtype), in float64
        qd, gd = q.double(), g.double()
        ref = reference.qaconv_match(qd, gd)
        case = (hq, wq, hg, wg, d, P, N)
        assert values.dtype == dtype and values.shape == ref.shape
        assert rel_err(values, ref) <= TOL[dtype], case
        assert torch.equal(qaconv_ext.qaconv_match(q, g), values), case
        S = reference.similarity(qd, gd)
        Lq = hq * wq
        at_row = torch.gather(S, 3, indices[..., :Lq].unsqueeze(-1)).squeeze(-1)
        at_col = torch.gather(S, 2, indices[..., Lq:].unsqueeze(2)).squeeze(2)
        assert (at_row - S.amax(3)).abs().max() <= 4e-6 and (at_col - S.amax(2)).abs().max() <= 4e-6, case
        out = qaconv_ext.qaconv_score(q, g, w, -0.25)
        assert out.dtype == torch.float32
        assert score_err(out, qd, gd, w, -0.25) <= 1e-6, case


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_dtypes_accumulate_the_exact_products_in_float32(dtype, gen):
    # widening to float32 is exact and every product of two bf16/fp16 numbers is exact in float32: the
    # scores equal those of the float32 maps holding the same values, bit for bit
    q = unit_maps(6, 40, 5, 3, dtype, gen)
    g = unit_maps(19, 40, 4, 4, dtype, gen)
    w = torch.randn(31, generator=gen)
    assert torch.equal(qaconv_ext.qaconv_score(q, g, w), qaconv_ext.qaconv_score(q.float(), g.float(), w))
    v16 = qaconv_ext.qaconv_match(q, g)
    assert v16.dtype == dtype
    assert torch.equal(v16, qaconv_ext.qaconv_match(q.float(), g.float()).to(dtype))


def test_reduced_dtypes_keep_the_nan_and_inf_policy(gen):
    for dtype in (torch.bfloat16, torch.float16):
        q = unit_maps(3, 8, 2, 2, torch.float32, gen)
        g = unit_maps(4, 8, 1, 3, torch.float32, gen)
        q[1, :, 0, 1] = float("nan")
        g[2, 0, 0, 1] = float("inf")
        q, g = q.to(dtype), g.to(dtype)
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        ref_v, ref_i = reference.qaconv_match(q.double(), g.double(), return_indices=True)
        assert torch.equal(torch.isnan(values), torch.isnan(ref_v))
        assert torch.equal(torch.isinf(values), torch.isinf(ref_v))
        assert torch.equal(torch.isnan(qaconv_ext.qaconv_match(q, g)), torch.isnan(ref_v))
        nan_rows = torch.isnan(ref_v)
        assert torch.equal(indices[nan_rows], ref_i[nan_rows])


def test_cpu_autocast_matches_in_bfloat16_and_differentiates_in_float32():
    """Inside CPU bfloat16 autocast, qaconv_match runs the bfloat16 kernel forward (the values of
    bfloat16-rounded maps) and the float32 backward through the same argmax."""
    from qaconv_ext import qaconv_match

    gen = torch.Generator().manual_seed(11)
    q = torch.nn.functional.normalize(torch.randn(3, 17, 5, 3, generator=gen), dim=1).requires_grad_()
    g = torch.nn.functional.normalize(torch.randn(4, 17, 2, 7, generator=gen), dim=1).requires_grad_()
    upstream = torch.randn(3, 4, 15 + 14, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = qaconv_match(q, g, return_indices=True)
    ref_values, ref_indices = qaconv_match(q.detach().bfloat16(), g.detach().bfloat16(), return_indices=True)
    assert values.dtype == torch.float32
    assert torch.equal(values, ref_values.float()) and torch.equal(indices, ref_indices)
    (values * upstream).sum().backward()
    gq, gg = torch.ops.qaconv_ext.match_backward(upstream, indices, q.detach(), g.detach(), [True, True])
    assert q.grad.dtype == torch.float32 and torch.equal(q.grad, gq) and torch.equal(g.grad, gg)
    # float64 check of the query gradient through the returned argmax
    qd, gd, up = q.detach().double(), g.detach().double(), upstream.double()
    want = torch.zeros_like(qd).flatten(2)
    Q, G = qd.flatten(2), gd.flatten(2)
    for p in range(3):
        for n in range(4):
            for s in range(15):
                want[p, :, s] += up[p, n, s] * G[n, :, indices[p, n, s]]
            for r in range(14):
                want[p, :, indices[p, n, 15 + r]] += up[p, n, 15 + r] * G[n, :, r]
    assert torch.allclose(q.grad.double().flatten(2), want, atol=1e-5)
