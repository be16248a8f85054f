"""bfloat16 maps on the CPU: the AVX512-BF16 kernel (or, without it, the widened float32 path) against
the float64 reference computed from the same bfloat16 inputs.

Products of bfloat16 values are exact in float32 and the kernel accumulates in float32, so the maxima
are float32 values with rounding errors of float32 sums: tolerances here are float32 ones.
 * scores (float32 out): |score - ref| <= 1e-6 * sum_k |value_k| |w_k| (the scale of their rounding);
 * match values (bfloat16 out, as the input): each is the reference maximum rounded to bfloat16, up to
   one float32 error: |value - ref| <= ulp_bf16(ref) / 2 + 1e-6 (inputs are unit-norm, |S| <= 1);
 * indices: the reference S at the returned index equals the reference maximum within 2e-6.
Fixed seeds throughout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qaconv_ext
from qaconv_ext import reference

SCORE_TOL = 1e-6
VALUE_TOL = 1e-6
INDEX_TOL = 2e-6

# (hq, wq, hg, wg): L = 1, 7, 33, 192, both directions of Lq != Lg, and equal sizes.
SHAPES = [(1, 1, 7, 1), (7, 1, 1, 1), (11, 3, 1, 7), (1, 7, 11, 3), (24, 8, 11, 3), (11, 3, 24, 8), (24, 8, 24, 8)]
CHANNELS = [1, 3, 64, 130]


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in fh)
    except OSError:
        return False


def _maps(n: int, d: int, h: int, w: int, seed: int, channels_last: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, h, w, generator=g, dtype=torch.float64), dim=1)
    x = x.to(torch.bfloat16)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _value_bound(ref: torch.Tensor) -> torch.Tensor:
    """Half a bfloat16 ulp of |ref| plus a float32 error (relative beyond 1): how far a value may lie."""
    mag = ref.abs().clamp_min(2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    return ulp / 2 + VALUE_TOL * mag.clamp_min(1.0)


def _check_values(values: torch.Tensor, ref: torch.Tensor) -> None:
    assert values.dtype == torch.bfloat16
    err = (values.double() - ref).abs()
    assert bool((err <= _value_bound(ref)).all()), float((err - _value_bound(ref)).max())


def _check_indices(q: torch.Tensor, g: torch.Tensor, indices: torch.Tensor) -> None:
    S = reference.similarity(q.double(), g.double())  # [P, N, Lq, Lg]
    Lq = S.shape[2]
    at_row = torch.gather(S, 3, indices[..., :Lq].unsqueeze(-1)).squeeze(-1)
    at_col = torch.gather(S, 2, indices[..., Lq:].unsqueeze(2)).squeeze(2)
    assert (at_row - S.amax(3)).abs().max().item() <= INDEX_TOL
    assert (at_col - S.amax(2)).abs().max().item() <= INDEX_TOL


def _score_error(out: torch.Tensor, q: torch.Tensor, g: torch.Tensor, w: torch.Tensor, bias: float) -> float:
    qd, gd, wd = q.double(), g.double(), w.double()
    ref = reference.qaconv_score(qd, gd, wd, bias)
    scale = reference.qaconv_match(qd, gd).abs() @ wd.abs()
    return float(((out.double() - ref).abs() / scale).max())


def test_the_kernel_serves_bfloat16_where_the_processor_has_it():
    isa = torch.ops.qaconv_ext.cpu_isa()
    assert isa in ("generic", "avx2", "avx512", "avx512bf16")
    if _cpu_has_avx512_bf16() and os.environ.get("QACONV_EXT_CPU_ISA", "auto") in ("auto", "avx512bf16"):
        assert isa == "avx512bf16"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d", CHANNELS)
def test_score_against_float64(shape, d):
    hq, wq, hg, wg = shape
    seed = 1000 * d + SHAPES.index(shape)
    for channels_last in (False, True):
        q = _maps(5, d, hq, wq, seed, channels_last)
        g = _maps(9, d, hg, wg, seed + 1, not channels_last)
        w = torch.randn(hq * wq + hg * wg, generator=torch.Generator().manual_seed(seed + 2))
        out = qaconv_ext.qaconv_score(q, g, w, 0.25)
        assert out.dtype == torch.float32 and out.shape == (5, 9)
        assert _score_error(out, q, g, w, 0.25) <= SCORE_TOL, (shape, d, channels_last)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("d", CHANNELS)
def test_match_against_float64(shape, d):
    hq, wq, hg, wg = shape
    seed = 2000 * d + SHAPES.index(shape)
    for channels_last in (False, True):
        q = _maps(4, d, hq, wq, seed, channels_last)
        g = _maps(10, d, hg, wg, seed + 1, channels_last)
        ref = reference.qaconv_match(q.double(), g.double())
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        _check_values(values, ref)
        _check_indices(q, g, indices)
        # values only take the in-register pooling: the same similarities, so the same maxima
        assert torch.equal(qaconv_ext.qaconv_match(q, g), values)


def test_maxima_are_float32_accurate():
    # a one-hot head reads one maximum out of the kernel in float32, before the rounding to bfloat16
    q, g = _maps(3, 130, 11, 3, 7), _maps(6, 130, 24, 8, 8)
    ref = reference.qaconv_match(q.double(), g.double())
    L = ref.shape[2]
    for k in (0, 5, 32, 33, 100, L - 1):
        w = torch.zeros(L)
        w[k] = 1.0
        out = qaconv_ext.qaconv_score(q, g, w)
        assert (out.double() - ref[..., k]).abs().max().item() <= VALUE_TOL, k


def test_many_tiles_and_threads_agree():
    # tile remainders in both directions; the result does not depend on how the work is split
    q, g = _maps(37, 64, 12, 4, 11), _maps(301, 64, 12, 4, 12)
    w = torch.randn(96, generator=torch.Generator().manual_seed(13))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (qaconv_ext.qaconv_score(q, g, w), qaconv_ext.qaconv_match(q, g, return_indices=True))
        torch.set_num_threads(max(2, threads))
        many = (qaconv_ext.qaconv_score(q, g, w), qaconv_ext.qaconv_match(q, g, return_indices=True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0])
    assert torch.equal(one[1][0], many[1][0]) and torch.equal(one[1][1], many[1][1])
    assert _score_error(one[0], q, g, w, 0.0) <= SCORE_TOL
    _check_values(one[1][0], reference.qaconv_match(q.double(), g.double()))


def test_strided_views():
    # channel slices and transposed spatial views: neither contiguous nor channels_last
    q = _maps(3, 64, 4, 5, 22).transpose(2, 3)
    w = torch.rand(40, generator=torch.Generator().manual_seed(23))
    for g in (_maps(6, 70, 5, 4, 21)[:, 3:67], _maps(6, 64, 4, 5, 24).transpose(2, 3),
              _maps(6, 70, 5, 4, 25, channels_last=True)[:, 2:66]):
        ref = reference.qaconv_match(q.double(), g.double())
        values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
        _check_values(values, ref)
        _check_indices(q, g, indices)
        assert torch.equal(qaconv_ext.qaconv_match(q, g), values)
        assert _score_error(qaconv_ext.qaconv_score(q, g, w), q, g, w, 0.0) <= SCORE_TOL


def test_nan_propagates_like_torch_max():
    q, g = _maps(3, 64, 6, 3, 31), _maps(4, 64, 5, 4, 32)
    q[1, :, 2, 1] = float("nan")  # query 1, location s = 7
    g[2, 5, 0, 3] = float("nan")  # gallery 2, location r = 3
    ref_v, ref_i = reference.qaconv_match(q.double(), g.double(), return_indices=True)
    values, indices = qaconv_ext.qaconv_match(q, g, return_indices=True)
    nan = torch.isnan(ref_v)
    assert torch.equal(torch.isnan(values), nan) and bool(nan[1, :, 7].all()) and bool(nan[:, 2, 18 + 3].all())
    assert torch.equal(indices[nan], ref_i[nan])  # the first NaN
    _check_values(values[~nan].reshape(-1), ref_v[~nan].reshape(-1))
    assert torch.equal(qaconv_ext.qaconv_match(q, g).isnan(), nan)
    score = qaconv_ext.qaconv_score(q, g, torch.ones(38))
    assert torch.equal(score.isnan(), nan.any(2))


def test_infinities_and_huge_values_are_ordinary_values():
    q, g = _maps(2, 16, 3, 3, 41), _maps(5, 16, 2, 5, 42)
    g[1, 0, 1, 2] = float("inf")
    g[3] = g[3] * 2.0 ** 60  # finite, but beyond the in-register path's range: the exact epilogue
    for values in (qaconv_ext.qaconv_match(q, g), qaconv_ext.qaconv_match(q, g, return_indices=True)[0]):
        ref = reference.qaconv_match(q.double(), g.double())
        assert torch.equal(torch.isnan(values), torch.isnan(ref)) and torch.equal(torch.isinf(values), torch.isinf(ref))
        assert bool(torch.isinf(values).any())
        finite = torch.isfinite(ref)
        _check_values(values[finite], ref[finite])
        assert torch.equal(values[torch.isinf(ref)].double(), ref[torch.isinf(ref)])


def test_opcheck_and_autograd():
    q = _maps(2, 8, 3, 2, 51).requires_grad_()
    g = _maps(3, 8, 2, 2, 52)
    w = torch.randn(10, generator=torch.Generator().manual_seed(53))
    torch.library.opcheck(torch.ops.qaconv_ext.match, (q.detach(), g, True))
    torch.library.opcheck(torch.ops.qaconv_ext.score, (q.detach(), g, w, torch.tensor(0.5)))
    qaconv_ext.qaconv_score(q, g, w, 0.5).sum().backward()
    qr = q.detach().double().requires_grad_()
    (reference.qaconv_match(qr, g.double()) @ w.double()).sum().backward()
    assert q.grad.dtype == torch.bfloat16
    assert ((q.grad.double() - qr.grad).abs().max() / qr.grad.abs().max()).item() <= 1e-2


_FALLBACK = r"""
import torch, qaconv_ext
from qaconv_ext import reference
assert torch.ops.qaconv_ext.cpu_isa() == "generic", torch.ops.qaconv_ext.cpu_isa()
g = torch.Generator().manual_seed(61)
q = torch.nn.functional.normalize(torch.randn(5, 130, 11, 3, generator=g, dtype=torch.float64), dim=1).bfloat16()
x = torch.nn.functional.normalize(torch.randn(7, 130, 24, 8, generator=g, dtype=torch.float64), dim=1).bfloat16()
w = torch.randn(225, generator=g)
torch.save({"score": qaconv_ext.qaconv_score(q, x, w, 0.5), "match": qaconv_ext.qaconv_match(q, x, True),
            "q": q, "x": x, "w": w}, __import__("sys").argv[1])
"""


def test_forced_fallback_matches_the_reference_and_the_kernel(tmp_path):
    # QACONV_EXT_CPU_ISA=generic, read when the library is first used, widens bfloat16 maps to float32
    path = tmp_path / "fallback.pt"
    env = dict(os.environ, QACONV_EXT_CPU_ISA="generic")
    out = subprocess.run([sys.executable, "-c", _FALLBACK, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = torch.load(path)
    q, x, w = res["q"], res["x"], res["w"]
    assert _score_error(res["score"], q, x, w, 0.5) <= SCORE_TOL
    values, indices = res["match"]
    _check_values(values, reference.qaconv_match(q.double(), x.double()))
    _check_indices(q, x, indices)
    # this process's kernel (the native one where the processor has it) agrees to float32 accuracy
    assert (qaconv_ext.qaconv_score(q, x, w, 0.5) - res["score"]).abs().max().item() <= 1e-5


def test_an_unknown_isa_name_is_refused():
    code = "import torch, qaconv_ext; torch.ops.qaconv_ext.cpu_isa()"
    env = dict(os.environ, QACONV_EXT_CPU_ISA="avx9000")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "QACONV_EXT_CPU_ISA=avx9000" in out.stderr


@pytest.mark.parametrize("layout", ["v2", "eccv"])
def test_evaluation_scores_bfloat16_maps_under_cpu_autocast(layout):
    from qaconv_ext.evaluation.scoring import qaconv_scores, qaconv_self_scores
    from qaconv_ext.head import QAConv

    torch.manual_seed(71)
    head = QAConv(32, 6, 3, layout=layout).eval()
    q = _maps(9, 32, 6, 3, 72).float()
    g = _maps(13, 32, 6, 3, 73).float() + 0.01  # not exactly representable in bfloat16
    weight, bias = head.folded()
    plain = qaconv_scores(head, q, g, query_chunk=4, gallery_chunk=5, progress=False)
    # float32 evaluation is the float32 op, unchanged
    assert torch.equal(plain, qaconv_ext.qaconv_score(q, g, weight.float(), bias.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = qaconv_scores(head, q, g, query_chunk=4, gallery_chunk=5, progress=False)
        mixed_self = qaconv_self_scores(head, g, chunk=5, progress=False)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, qaconv_ext.qaconv_score(q.bfloat16(), g.bfloat16(), weight.float(), bias.float()))
    # (the symmetric v2 head mirrors blocks: its scores may differ in the last bit of the head's sum)
    direct_self = qaconv_ext.qaconv_score(g.bfloat16(), g.bfloat16(), weight.float(), bias.float())
    assert (mixed_self - direct_self).abs().max().item() <= 1e-6 * direct_self.abs().max().item()
    assert not torch.equal(mixed, plain)


def test_match_benchmark_runs(tmp_path, monkeypatch):
    # plumbing of benchmarks/bench_match.py on a tiny problem (timings mean nothing here)
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    monkeypatch.syspath_prepend(bench)
    import bench_match

    try:
        out = tmp_path / "match.json"
        rec = bench_match.main(["--queries", "3", "--gallery", "20", "--height", "4", "--width", "3",
                                "--channels", "16", "--repeats", "1", "--mm-size", "64", "--sweep-gflop", "0.02",
                                "--methods", "fused score", "fused score bfloat16", "gemm bfloat16",
                                "map-size sweep", "--json", str(out)])
    finally:
        sys.modules.pop("bench_match", None)
        sys.modules.pop("_machine", None)
    assert json.loads(out.read_text())["benchmark"] == "cpu_match"
    res = rec["results"]
    assert res["fused score"]["dtype"] == "float32" and res["fused score bfloat16"]["dtype"] == "bfloat16"
    assert res["gemm bfloat16"]["gflops"] > 0 and res["fused score bfloat16"]["fraction_of_gemm"] > 0
    assert rec["bfloat16_vs_float32_pairs_per_s"]["score"] > 0
    assert [(r["height"], r["width"], r["channels"]) for r in rec["sweep"]] == [(12, 4, 128), (24, 8, 128),
                                                                             (48, 16, 128)]
    for row in rec["sweep"]:
        assert row["bfloat16_score_max_rel_diff"] < 0.05  # bfloat16 maps: scores to about 1e-2
    assert rec["sweep_fraction_of_24x8"]["24x8 d=128 float32"] == 1.0
