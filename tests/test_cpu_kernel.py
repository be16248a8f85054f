"""The CPU kernel's own properties: composition independence, variants, shapes off its tiles, reduced dtypes.

* A pair's values and score are bit-identical whatever batch it is scored in (other queries, other
  gallery images, its position in a gallery block, the number of threads) and whichever micro-kernel
  variant runs (each similarity is one FMA chain over the channels in order; gemm_tile.h). Streaming
  top-k, sparse re-ranking and sharded evaluation compare with the dense result exactly and rely on it.
* Every variant against the float64 reference on shapes that are no multiple of the register tile
  (4 query locations x 24 or 48 gallery columns), of the 16 epilogue lanes or of the 128-channel passes.
* float16 maps are read in their own dtype (widened while packing), accumulated in float32.
* bfloat16 maps are packed in channel pairs and every variant computes each similarity in the order and
  with the denormal rule of VDPBF16PS (odd channel then even channel per pair, denormals read as zero,
  tiny results flushed): the avx512bf16 variant runs the instruction, the others an exact twin. The
  instruction and the twin are compared lane by lane by a small C++ driver (tests/bf16_lanes.cpp).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import qaconv_ext
from helpers import pair_order, rel_err, score_err, unit_maps
from qaconv_ext import reference
from qaconv_ext.ops import _library

pytestmark = pytest.mark.skipif(not _library.NATIVE, reason="the compiled CPU kernels are not built")

# Tolerances of the op contract tests (tests/test_ops.py) and of the CUDA bf16/fp16 paths.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
REDUCED = [torch.float32, torch.bfloat16, torch.float16]


def _variants():
    """The micro-kernel variants this processor runs (the portable ones always)."""
    names = ["generic", "generic16"]
    for name in ("avx2", "avx512", "avx512bf16"):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 2, 2, 2, 16), (7, 5, 3, 6, 17), (3, 4, 2, 9, 131), (1, 3, 2, 2, 1)])
def test_variants_give_identical_bits(shape, dtype, gen, monkeypatch):
    # the portable variants (std::fma) and the x86 ones (FMA instructions, VDPBF16PS) round identically
    hq, wq, hg, wg, d = shape
    q = unit_maps(5, d, hq, wq, dtype, gen)
    g = unit_maps(13, d, hg, wg, dtype, gen)
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


def test_float16_accumulates_the_exact_products_in_float32(gen):
    # widening to float32 is exact and every product of two float16 numbers is exact in float32: the
    # scores equal those of the float32 maps holding the same values, bit for bit
    dtype = torch.float16
    q = unit_maps(6, 40, 5, 3, dtype, gen)
    g = unit_maps(19, 40, 4, 4, dtype, gen)
    w = torch.randn(31, generator=gen)
    assert torch.equal(qaconv_ext.qaconv_score(q, g, w), qaconv_ext.qaconv_score(q.float(), g.float(), w))
    v16 = qaconv_ext.qaconv_match(q, g)
    assert v16.dtype == dtype
    assert torch.equal(v16, qaconv_ext.qaconv_match(q.float(), g.float()).to(dtype))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [40, 17, 1])
def test_bfloat16_runs_the_pairwise_chain(variant, d, gen, monkeypatch):
    # with no denormal on the way (unit maps), the bfloat16 kernel's chain is the float32 one over the
    # channels in the order 1, 0, 3, 2, ...: the scores equal the float32 kernel's on maps so reordered
    monkeypatch.setenv("QACONV_CPU_KERNEL", variant)
    q = unit_maps(6, d, 5, 3, torch.bfloat16, gen)
    g = unit_maps(19, d, 4, 4, torch.bfloat16, gen)
    w = torch.randn(31, generator=gen)
    score = qaconv_ext.qaconv_score(q, g, w)
    assert torch.equal(score, qaconv_ext.qaconv_score(pair_order(q), pair_order(g), w))
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    ref_values, ref_indices = qaconv_ext.qaconv_match(pair_order(q), pair_order(g), return_indices=True)
    assert values.dtype == torch.bfloat16
    assert torch.equal(values, ref_values.bfloat16()) and torch.equal(indices, ref_indices)
    if d > 2:  # the order shows: some scores differ from those of the channels in order (widened float32)
        assert not torch.equal(score, qaconv_ext.qaconv_score(q.float(), g.float(), w))


def test_default_variant_follows_the_processor(monkeypatch):
    monkeypatch.delenv("QACONV_CPU_KERNEL", raising=False)
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if "avx512_bf16" in flags and "avx512f" in flags:
        assert qaconv_ext.cpu_kernel() == "avx512bf16"
    elif "avx512_bf16" not in flags and sys.platform.startswith("linux"):
        monkeypatch.setenv("QACONV_CPU_KERNEL", "avx512bf16")
        with pytest.raises(ValueError, match="QACONV_CPU_KERNEL=avx512bf16"):
            qaconv_ext.cpu_kernel()


@pytest.fixture(scope="module")
def lanes_driver(tmp_path_factory):
    """tests/bf16_lanes.cpp built with the C++ compiler against the kernel sources (no torch)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler to build tests/bf16_lanes.cpp (the extension needs one too)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path_factory.mktemp("bf16") / "bf16_lanes")
    subprocess.run([cxx, "-std=c++17", "-O2", "-I", os.path.join(root, "csrc"),
                    os.path.join(root, "tests", "bf16_lanes.cpp"), os.path.join(root, "csrc", "cpu", "gemm_tile.cpp"),
                    "-o", exe], check=True)
    out = subprocess.run([exe, "3200000", "7"], check=True, capture_output=True, text=True).stdout
    return out


def test_instruction_and_its_twin_agree_bit_for_bit(lanes_driver):
    # 3.2 M lanes of VDPBF16PS (zeros, denormals, infinities, NaNs, sums next to FLT_MIN) against the
    # portable twin; the other product order, a single rounding and a flush of the gradual-underflow result
    # are counted to show what the test sees
    m = re.search(r"instruction lanes (\d+) nan (\d+) mismatches (\d+) other_order_differs (\d+) "
                  r"one_rounding_differs (\d+) flushed (\d+) gradual_flush_differs (\d+)", lanes_driver)
    if m is None:
        reason = re.search(r"instruction unavailable: (.*)", lanes_driver)
        assert reason is not None, lanes_driver
        pytest.skip(reason.group(1))
    lanes, nan, mismatches, other_order, one_rounding, flushed, gradual_flush = map(int, m.groups())
    assert lanes == 3200000 and mismatches == 0, lanes_driver
    assert other_order > lanes // 20 and one_rounding > lanes // 20 and flushed > 0 and nan > 0
    assert gradual_flush > 1000  # the lanes where only tininess after rounding gives the instruction's bits


def test_tile_variants_flush_like_the_instruction(lanes_driver):
    # tiles whose chains keep crossing FLT_MIN (300 pairs: three passes): every variant equals the twin's
    # chain, which a chain with gradual underflow would not
    assert int(re.search(r"tile elements \d+ unflushed_differs (\d+)", lanes_driver).group(1)) > 100
    results = dict(re.findall(r"tile (\w+) mismatches (\d+)", lanes_driver))
    assert set(VARIANTS) <= set(results), lanes_driver
    assert all(v == "0" for v in results.values()), lanes_driver


def test_reduced_dtypes_keep_the_nan_and_inf_policy(gen, monkeypatch):
    for dtype, variant in [(torch.float16, None)] + [(torch.bfloat16, v) for v in VARIANTS]:
        if variant is not None:
            monkeypatch.setenv("QACONV_CPU_KERNEL", variant)
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


def test_cpu_autocast_matches_in_bfloat16_and_differentiates_in_float32(monkeypatch):
    """Inside CPU bfloat16 autocast, qaconv_match runs the bfloat16 kernel forward (the values of
    bfloat16-rounded maps) and the float32 backward through the same argmax."""
    from qaconv_ext import qaconv_match

    gen = torch.Generator().manual_seed(11)
    q = torch.nn.functional.normalize(torch.randn(3, 17, 5, 3, generator=gen), dim=1).requires_grad_()
    g = torch.nn.functional.normalize(torch.randn(4, 17, 2, 7, generator=gen), dim=1).requires_grad_()
    upstream = torch.randn(3, 4, 15 + 14, generator=gen)
    seen = []
    real = torch.ops.qaconv_ext.match
    monkeypatch.setattr(torch.ops.qaconv_ext, "match",
                        lambda a, b, *rest: (seen.append((a.dtype, b.dtype)), real(a, b, *rest))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = qaconv_match(q, g, return_indices=True)
    monkeypatch.undo()
    # the op itself gets bfloat16 maps, which the CPU kernel scores in channel pairs
    assert seen == [(torch.bfloat16, torch.bfloat16)]
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
