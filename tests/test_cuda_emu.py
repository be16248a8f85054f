"""The CUDA kernels of csrc/cuda, executed on the CPU by the warp-level emulator of tests/cuda_emu.

The unmodified kernel files are compiled with g++ against the emulation layer (cached under
build/cuda_emu/) and run through their launchers: every kernel (tensor-core score, CUDA-core match
with and without indices, the fallback score kernel, the backward) in float32 / float16 / bfloat16.
Integer-valued inputs make every sum exact, so results must equal the float64 reference bit for bit;
real-valued inputs are compared with a stated tolerance. Sizes cross every tile edge: the CUDA-core
kernel's 64 x 64 tiles and 16-channel chunks, the tensor-core kernel's 48 x 64 warp tiles (and more
tiles than its 12 warps), k = 16 steps, several CTAs per query, gallery chunks streamed through one
CTA (two stages and one), the backward's warps of 32 locations and 128-channel passes. Each case runs
under several scheduling orders with identical results, while the emulator checks shared-memory races,
warp divergence, deadlocks, cp.async completion and global bounds on every access.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

import cuda_emu
from cuda_emu import DEVICES, EmuError, Emulator
from cuda_emu.reference import (assert_same, backward_reference, int_maps, match_reference,
                                score_reference)

pytestmark = pytest.mark.skipif(cuda_emu.compiler() is None, reason="no C++ compiler (g++ or $CXX) to build the "
                                                                  "CUDA emulator")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]


@pytest.fixture(scope="module")
def emu() -> Emulator:
    e = Emulator(cuda_emu.build())
    yield e
    e.configure()


@pytest.fixture(autouse=True)
def _default_device(emu):
    emu.configure()
    yield


def rotate_schedule(emu: Emulator, case: int) -> None:
    """Cases take turns with the schedules (forward, reverse, random with two seeds)."""
    schedule, seed = SCHEDULES[case % len(SCHEDULES)]
    emu.configure(schedule=schedule, seed=seed)


# ---- the emulator's own parts ------------------------------------------------------------------

def cute_layout(shape, stride):
    """Evaluates a CuTe layout (nested shapes/strides, column-major coordinates) for every index."""
    def flat(s):
        return [x for e in s for x in flat(e)] if isinstance(s, tuple) else [s]
    shp, std = flat(shape), flat(stride)
    out = []
    for i in range(int(np.prod(shp))):
        off, rest = 0, i
        for n, s in zip(shp, std):
            off += (rest % n) * s
            rest //= n
        out.append(off)
    return out


# CUTLASS CuTe, cute/atom/mma_traits_sm80.hpp, MMA_Traits<SM80_16x8x16_F32F16F16F32_TN> (the bf16 one
# shares it): (thread, value) -> column-major index into A (M16 x K16), B (N8 x K16), C (M16 x N8).
CUTE_A = cute_layout(((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128)))
CUTE_B = cute_layout(((4, 8), (2, 2)), ((16, 1), (8, 64)))
CUTE_C = cute_layout(((4, 8), (2, 2)), ((32, 1), (16, 8)))


@pytest.mark.parametrize("dtype", HALF)
def test_mma_fragments_match_cute(emu, dtype, gen):
    """The emulated mma.m16n8k16 with fragments laid out by CuTe's SM80 16x8x16 layouts computes A B + C."""
    A = torch.randint(-8, 9, (16, 16), generator=gen).to(dtype)
    B = torch.randint(-8, 9, (16, 8), generator=gen).to(dtype)
    C = torch.randint(-50, 51, (16, 8), generator=gen).float()
    # CuTe enumerates (thread t, value v) as t + 32 v; index m + 16 k (A), n + 8 k (B), m + 16 n (C).
    def per_lane(layout, to_flat):
        return torch.tensor([to_flat(i) for i in layout]).view(-1, 32).t()
    a_idx = per_lane(CUTE_A, lambda i: (i % 16) * 16 + i // 16)  # into row-major A[m][k]
    b_idx = per_lane(CUTE_B, lambda i: (i // 8) * 8 + i % 8)     # into B[k][n]
    c_idx = per_lane(CUTE_C, lambda i: (i % 16) * 8 + i // 16)   # into C[m][n]
    D = emu.probe_mma(A, B, C, a_idx, b_idx, c_idx)
    assert_same(D, A.double() @ B.double() + C.double(), "mma")


def test_ldmatrix_matches_cute(emu, gen):
    """ldmatrix.x4: CuTe's SM75_U32x4_LDSM_N (src: lane t addresses 128 bits t; dst: lane t, register j
    holds bits 32 t + 1024 j) with the rows addressed in a shuffled order."""
    rows = torch.randint(-2**31, 2**31 - 1, (32, 4), generator=gen, dtype=torch.int64).int()
    row_of = torch.randperm(32, generator=gen)
    out = emu.probe_ldmatrix(rows, row_of)
    src_bits = cute_layout((32, 128), (128, 1))
    dst_bits = cute_layout((32, (32, 4)), (32, (1, 1024)))
    for t, j in itertools.product(range(32), range(4)):
        bit = dst_bits[t + 32 * (0 + 32 * j)]  # the first bit of lane t's register j
        k = src_bits.index(bit)                 # (source lane, bit) = (k % 32, k // 32)
        assert out[t, j] == rows[row_of[k % 32], k // 32 // 32], (t, j)


def test_16bit_conversions(emu, gen):
    """__float2half_rn / __float2bfloat16_rn round to nearest even like torch, across the range."""
    x = torch.cat([torch.randn(4000, generator=gen) * s for s in (1e-7, 1e-5, 1e-3, 1.0, 1e3, 6e4, 1e5)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65520.0,
                                    65519.99, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1 + 2.0**-11, 1 + 3 * 2.0**-11])])
    for dtype in HALF:
        got, ref = emu.convert(x, dtype), x.to(dtype).float()
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(got[~torch.isnan(ref)],
                                                                               ref[~torch.isnan(ref)]), dtype


@pytest.mark.parametrize("fault, message", [(0, "shared-memory race"), (1, "divergent warp collective"),
                                            (2, "deadlock"), (3, "shared memory out of bounds"),
                                            (4, "global memory out of bounds: .* reads"),
                                            (6, "global memory out of bounds: .* writes"),
                                            (7, "write to a read-only input")])
def test_emulator_stops_faulty_kernels(emu, fault, message):
    with pytest.raises(EmuError, match=message):
        emu.probe_fault(fault)
    out = emu.probe_fault(5)  # the same kernel, synchronised: runs
    assert torch.equal(out, torch.arange(64.0).roll(-32))


def test_launch_limits(emu):
    """Dynamic shared memory above 48 KiB needs cudaFuncSetAttribute (the probe does not set it)."""
    with pytest.raises(EmuError, match="above the kernel's limit"):
        emu.probe_fault(5, smem_bytes=48 * 1024 + 16)
    emu.probe_fault(5, smem_bytes=48 * 1024)


# ---- the kernels ---------------------------------------------------------------------------------

# (P, N, Lq, Lg, d): the CUDA-core kernels' 64 x 64 tiles and 16-channel chunks, partial and whole.
MATCH_SHAPES = [(2, 3, 70, 35, 20), (1, 2, 1, 130, 3), (3, 1, 64, 64, 16), (2, 2, 9, 7, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MATCH_SHAPES)
def test_match_exact(emu, dtype, shape, gen):
    """match_forward with and without indices: values and first-index argmax bit-exact (many ties)."""
    rotate_schedule(emu, MATCH_SHAPES.index(shape) + DTYPES.index(dtype))
    P, N, Lq, Lg, d = shape
    hi = 3 if d <= 24 else 1  # |sums| <= 256: exact in bfloat16 as well
    q, g = int_maps(P, Lq, d, gen, hi).to(dtype), int_maps(N, Lg, d, gen, hi).to(dtype)
    values, indices = emu.match(q, g)
    ref_v, ref_i = match_reference(q, g)
    assert values.dtype == dtype
    assert_same(values, ref_v, "values")
    assert torch.equal(indices, ref_i), "indices (first index on ties)"
    assert torch.equal(emu.match(q, g, with_indices=False)[0], values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_match_nan_propagates(emu, dtype, gen):
    P, N, Lq, Lg, d = 2, 2, 70, 20, 5
    q, g = int_maps(P, Lq, d, gen).to(dtype), int_maps(N, Lg, d, gen).to(dtype)
    q[1, 66, 2] = float("nan")  # query 1, location 66 (second row tile)
    g[0, 3, 0] = float("nan")
    values, indices = emu.match(q, g)
    ref_v, ref_i = match_reference(q, g)
    assert torch.isnan(values).any()
    assert_same(values, ref_v, "values")
    assert torch.equal(indices, ref_i)


def test_match_real_inputs(emu, gen):
    """float32 real-valued maps: within 1e-5 relative of float64 (fmaf accumulation over 40 channels)."""
    q, g = torch.randn(2, 70, 40, generator=gen), torch.randn(3, 35, 40, generator=gen)
    values, _ = emu.match(q, g)
    ref, _ = match_reference(q, g)
    assert ((values.double() - ref).abs() / ref.abs().clamp_min(1)).max() < 1e-5


# (P, N, Lq, Lg, d) for the score kernels; the tensor-core kernel: 48 x 64 warp tiles, k steps of 16,
# up to 12 warps (16 tiles in the last case: warps take several tiles).
SCORE_SHAPES = [(2, 3, 50, 70, 24), (1, 2, 100, 130, 8), (2, 2, 7, 5, 40), (1, 1, 150, 200, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES)
def test_score_exact(emu, dtype, shape, gen):
    """Both score kernels (CUDA cores: every dtype; tensor cores: float16 / bfloat16) bit-exact, with the
    head's weights and bias (and without bias)."""
    rotate_schedule(emu, SCORE_SHAPES.index(shape) + DTYPES.index(dtype))
    P, N, Lq, Lg, d = shape
    q, g = int_maps(P, Lq, d, gen, 2).to(dtype), int_maps(N, Lg, d, gen, 2).to(dtype)
    w = torch.randint(-3, 4, (Lq + Lg,), generator=gen).float()
    for bias in (torch.tensor([-2.5]), None):
        ref = score_reference(q, g, w, None if bias is None else bias.item())
        assert_same(emu.score(q, g, w, bias, tensor_cores=False), ref, f"CUDA-core score {dtype}")
        if dtype != torch.float32:
            assert_same(emu.score(q, g, w, bias, tensor_cores=True), ref, f"tensor-core score {dtype}")


@pytest.mark.parametrize("dtype", HALF)
def test_score_real_inputs(emu, dtype, gen):
    """Real-valued unit maps: the tensor-core kernel multiplies the 16-bit inputs exactly and accumulates
    in float32 (the emulator rounds each mma's sum once): within 1e-5 of float64 on the same inputs."""
    P, N, Lq, Lg, d = 2, 3, 50, 70, 24
    q = torch.nn.functional.normalize(torch.randn(P, Lq, d, generator=gen), dim=2).to(dtype)
    g = torch.nn.functional.normalize(torch.randn(N, Lg, d, generator=gen), dim=2).to(dtype)
    w = torch.randn(Lq + Lg, generator=gen)
    ref = score_reference(q, g, w, 0.5)
    for tc in (True, False):
        out = emu.score(q, g, w, torch.tensor([0.5]), tensor_cores=tc)
        assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max().clamp_min(1), tc


@pytest.mark.parametrize("tensor_cores", [True, False])
def test_score_nan_propagates(emu, tensor_cores, gen):
    q, g = int_maps(2, 50, 16, gen).half(), int_maps(3, 70, 16, gen).half()
    g[2, 69, 3] = float("nan")
    w = torch.randint(-3, 4, (120,), generator=gen).float()
    out = emu.score(q, g, w, None, tensor_cores=tensor_cores)
    assert torch.isnan(out[:, 2]).all() and not torch.isnan(out[:, :2]).any()


def test_score_gallery_chunks(emu, gen):
    """Several CTAs per query and up to 64 gallery images per CTA through the two-stage pipeline, and the
    one-stage pipeline where two stages do not fit the device's shared memory."""
    P, N, Lq, Lg, d = 4, 70, 4, 5, 8
    q, g = int_maps(P, Lq, d, gen).bfloat16(), int_maps(N, Lg, d, gen).bfloat16()
    w = torch.randint(-3, 4, (Lq + Lg,), generator=gen).float()
    ref = score_reference(q, g, w, 1.0)
    one_sm = dataclasses.replace(DEVICES["sm_80"], sms=1)
    plan = emu.plan(one_sm, P, N, d, Lq, Lg)
    assert plan["supported"] and plan["stages"] == 2 and plan["per_cta"] == 64 and plan["chunks"] == 2
    one_stage = emu.plan(one_sm, 1, 1, d, Lq, Lg)["smem_bytes"] - 1  # just below what two stages need
    assert one_stage > 0
    for device in (one_sm, dataclasses.replace(one_sm, smem_optin=emu.plan(dataclasses.replace(
            one_sm, smem_optin=10**6), 1, 1, d, Lq, Lg)["smem_bytes"] - 1)):
        emu.configure(device)
        p = emu.plan(device, P, N, d, Lq, Lg)
        assert p["supported"]
        ctas = emu.stats()["ctas"]
        assert_same(emu.score(q, g, w, torch.tensor([1.0]), tensor_cores=True), ref, f"stages {p['stages']}")
        assert emu.stats()["ctas"] - ctas == P * p["chunks"]
    assert p["stages"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 35, 40, 20), (1, 2, 33, 3, 130)])
def test_backward_exact(emu, dtype, shape, gen):
    """match_backward (warps of 32 locations, 128-channel passes) against the float64 scatter of the
    gradient through the argmax; grad_q only and grad_g only as well."""
    rotate_schedule(emu, shape[4] + DTYPES.index(dtype))
    P, N, Lq, Lg, d = shape
    q, g = int_maps(P, Lq, d, gen, 2).to(dtype), int_maps(N, Lg, d, gen, 2).to(dtype)
    _, indices = emu.match(q, g)
    gv = torch.randint(-2, 3, (P, N, Lq + Lg), generator=gen).float()
    ref_q, ref_g = backward_reference(gv, indices, q, g)
    gq, gg = emu.backward(gv, indices, q, g)
    assert_same(gq, ref_q, "grad_q")
    assert_same(gg, ref_g, "grad_g")
    assert torch.equal(emu.backward(gv, indices, q, g, need_g=False)[0], gq)
    assert torch.equal(emu.backward(gv, indices, q, g, need_q=False)[1], gg)


@pytest.mark.parametrize("schedule, seed", SCHEDULES[1:])
def test_schedules_agree(emu, schedule, seed, gen):
    """The same launches under other thread orders (reverse, random warp orders at every barrier) give
    the same bits as the forward order (and the race checks pass under each)."""
    q, g = int_maps(2, 50, 24, gen).half(), int_maps(3, 70, 24, gen).half()
    w = torch.randint(-3, 4, (120,), generator=gen).float()
    gv = torch.randn(2, 3, 120, generator=gen)

    def run():
        v, i = emu.match(q, g)
        return [v, i, emu.score(q, g, w, None, True), emu.score(q, g, w, None, False), *emu.backward(gv, i, q, g)]
    emu.configure(schedule="forward")
    base = run()
    emu.configure(schedule=schedule, seed=seed)
    for a, b in zip(base, run()):
        assert torch.equal(a, b)


# ---- launch planning (launch_plan.h) and the dispatcher ---------------------------------------------

# Feature maps (h x w, d) of the planning table in docs/CUDA.md.
PLAN_MAPS = [(24, 8, 128), (16, 8, 128), (24, 16, 128), (24, 8, 256), (12, 4, 512), (24, 8, 512), (32, 32, 64)]


def plan_table(emu: Emulator) -> list:
    """Markdown rows: per map size and device, the tensor-core plan (stages, shared KiB) or the fallback."""
    rows = []
    for h, w, d in PLAN_MAPS:
        cells = []
        for dev in DEVICES.values():
            p = emu.plan(dev, 64, 1000, d, h * w, h * w)
            cells.append(f"{p['stages']} stage{'s' * (p['stages'] > 1)}, {p['smem_bytes'] / 1024:.1f} KiB"
                         if p["supported"] else "CUDA cores")
        rows.append(f"| {h} × {w}, d = {d} | " + " | ".join(cells) + " |")
    return rows


def test_plan_table_in_docs(emu):
    """docs/CUDA.md's planning table is the planner's output for the four device profiles."""
    doc = (cuda_emu.ROOT / "docs" / "CUDA.md").read_text()
    for row in plan_table(emu):
        assert row in doc, f"docs/CUDA.md lacks the row\n{row}"


@pytest.mark.parametrize("device", list(DEVICES))
def test_plans_fit_the_device(emu, device):
    """Every supported plan fits the device's shared memory, takes two stages where they fit, and never
    runs below sm_80; the shapes the README names fall back on the A100 (d = 512; 24 x 16 maps at d = 128)."""
    dev = DEVICES[device]
    for (h, w, d), (P, N) in itertools.product(PLAN_MAPS + [(7, 5, 8), (48, 16, 64)], [(1, 1), (3, 700), (500, 20)]):
        L = h * w
        p = emu.plan(dev, P, N, d, L, L)
        two = emu.plan(dataclasses.replace(dev, smem_optin=10**9), P, N, d, L, L)
        if dev.major < 8:
            assert not p["supported"]
            continue
        assert p["supported"] == (emu.plan(dataclasses.replace(dev, smem_optin=10**9), 1, 1, d, L, L)
                                  ["supported"] and p["smem_bytes"] <= dev.smem_optin)
        if p["supported"]:
            assert p["smem_bytes"] <= dev.smem_optin and p["stages"] == (2 if two["smem_bytes"] <= dev.smem_optin
                                                                         else 1)
            assert 1 <= p["per_cta"] <= 64 and p["chunks"] * p["per_cta"] >= N and p["warps"] <= 12
    if device == "sm_80":
        for h, w, d in [(24, 8, 512), (24, 16, 128)]:
            assert not emu.plan(dev, 64, 1000, d, h * w, h * w)["supported"]


@pytest.mark.parametrize("device", list(DEVICES))
def test_fallback_gives_the_same_numbers(emu, device, gen):
    """On each device profile the dispatcher runs what the plan says (tensor cores or the CUDA-core
    fallback), and the scores are bit-identical to float64 on exact inputs: 24 x 16 maps at d = 128 (the
    fallback everywhere) and 24 x 8 at d = 128 (two stages on sm_80 and sm_90, the fallback on sm_75 and
    sm_89)."""
    dev = DEVICES[device]
    emu.configure(dev)
    for (h, w, d), P, N in [((24, 16, 128), 1, 1), ((24, 8, 128), 1, 2)]:
        L = h * w
        q, g = int_maps(P, L, d, gen, 1).half(), int_maps(N, L, d, gen, 1).half()
        wt = torch.randint(-2, 3, (2 * L,), generator=gen).float()
        out, used = emu.score_dispatch(q, g, wt, torch.tensor([0.5]))
        assert used.startswith("tensor") == bool(emu.plan(dev, P, N, d, L, L)["supported"]), (used, h, w, d)
        assert_same(out, score_reference(q, g, wt, 0.5), f"{device} {h}x{w} d={d} ({used})")


@pytest.mark.parametrize("dtype, precision, simple, scale, expect", [
    (torch.float32, "highest", False, 1, "CUDA cores"),
    (torch.float32, "high", False, 1, "tensor cores (torch.float16)"),
    (torch.float32, "high", False, 2**15, "tensor cores (torch.bfloat16)"),  # beyond float16's range
    (torch.float32, "medium", False, 1, "tensor cores (torch.bfloat16)"),
    (torch.float16, "highest", False, 1, "tensor cores (torch.float16)"),
    (torch.bfloat16, "highest", False, 1, "tensor cores (torch.bfloat16)"),
    (torch.float16, "highest", True, 1, "CUDA cores"),
])
def test_dispatcher_paths(emu, dtype, precision, simple, scale, expect, gen):
    """Every dtype path of qaconv_score's dispatcher (kernel choice, float32 staging, channel padding to a
    multiple of 8: d = 13), bit-exact against float64 on the inputs each kernel is given."""
    P, N, Lq, Lg, d = 2, 3, 50, 70, 13
    q, g = int_maps(P, Lq, d, gen, 2) * scale, int_maps(N, Lg, d, gen, 2) * scale
    q[0, 0, 0] = 3 * scale  # |values| up to 3 * 2^15 = 98304 > 65504: staged in bfloat16
    q, g = q.to(dtype), g.to(dtype)
    w = torch.randint(-3, 4, (Lq + Lg,), generator=gen).float()
    bias = float(scale * scale)  # a multiple of the scores' last bit: their sums stay exact
    out, used = emu.score_dispatch(q, g, w, torch.tensor([bias]), float32_precision=precision, simple=simple)
    assert used == expect
    assert_same(out, score_reference(q, g, w, bias), used)
