"""Gallery-scale matching on the GPU: the fused score op against the unfused path and a dense GEMM.

All three on one device in one run, synthetic unit-norm bfloat16 features, L = 24 x 8, d = 128:

* (a) fused ``qaconv_score`` over the whole query x gallery matrix (chunked over queries only to bound
  the output's memory when it is large), on tensor cores; and the same op on its CUDA-core kernel
  (``QACONV_EXT_CUDA_KERNEL=simple``) on a slice of the queries;
* (b) the unfused path re-id code runs today: per 128 x 128 block of queries x gallery, a float16
  einsum into ``[128, 128, L, L]``, the two max reductions, and the head;
* (c) a dense bfloat16 ``torch.mm`` with the same FLOP count per call, as the achievable peak.

Plus the training-sized problem (32 x 751 pairs): ``qaconv_match`` with indices and its backward
against the reference's autograd. Wall times come from CUDA events after warm-up (median of repeats).
Large problems are timed on a slice of the queries and scaled to the full size; the JSON says so.

    python benchmarks/bench_gallery.py                   # Market-1501 and MSMT17 sizes
    python benchmarks/bench_gallery.py --sizes market --json /tmp/g.json
    python benchmarks/bench_gallery.py --device cpu --sizes tiny ...   # a smoke run of the script (tests)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from _machine import add_output_args, cpu_name, output_path, write_json

RESULT_NAME = "gpu_gallery.json"
SIZES = {"market": (3368, 15913), "msmt": (11659, 82161), "tiny": (40, 300)}
DEVICE = torch.device("cuda")  # set by main(); "cpu" only serves smoke runs of the script


def _unit(n: int, d: int, h: int, w: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    out = torch.empty(n, d, h, w, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    for s in range(0, n, 4096):  # normalise in float32 pieces to bound the temporary memory
        x = torch.randn(min(4096, n - s), d, h, w, device=DEVICE, generator=g)
        out[s:s + x.shape[0]] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def _time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn``: CUDA events on the GPU, the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    if DEVICE.type != "cuda":
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _reset_peak() -> int:
    """Start measuring peak device memory; returns the memory allocated now (0 off the GPU)."""
    if DEVICE.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_extra(base: int) -> int:
    """Peak device memory above ``base`` since :func:`_reset_peak` (0 off the GPU)."""
    return torch.cuda.max_memory_allocated() - base if DEVICE.type == "cuda" else 0


def fused_score(query: torch.Tensor, gallery: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                out: torch.Tensor) -> None:
    import qaconv_ext

    out.copy_(qaconv_ext.qaconv_score(query, gallery, weight, bias))


def unfused_score(query: torch.Tensor, gallery: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  out: torch.Tensor, block: int = 128) -> None:
    """What re-id code does without the op: einsum, two max passes and the head, per 128 x 128 block."""
    q = query.flatten(2).half()  # [P, d, Lq]
    g = gallery.flatten(2).half()
    Lq = q.shape[2]
    wq, wg = weight[:Lq].half(), weight[Lq:].half()
    for p0 in range(0, q.shape[0], block):
        qb = q[p0:p0 + block]
        for n0 in range(0, g.shape[0], block):
            S = torch.einsum("pdl,ndm->pnlm", qb, g[n0:n0 + block])
            score = S.amax(3) @ wq + S.amax(2) @ wg
            out[p0:p0 + block, n0:n0 + block] = score.float() + bias


def measure_size(name: str, P: int, N: int, args: argparse.Namespace) -> Dict[str, object]:
    import qaconv_ext  # noqa: F401  (loads the op)

    L = args.height * args.width
    d = args.channels
    flop_pair = 2.0 * L * L * d
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    gallery = _unit(N, d, args.height, args.width, torch.bfloat16, 1)
    p_fused = min(P, args.max_queries_fused)
    query = _unit(p_fused, d, args.height, args.width, torch.bfloat16, 2)
    weight = torch.full((2 * L,), 1.0 / L, device=DEVICE)
    bias = torch.zeros((), device=DEVICE)
    out = torch.empty(p_fused, N, device=DEVICE)
    base = _reset_peak()
    t_fused = _time(lambda: fused_score(query, gallery, weight, bias, out), args.repeats)
    extra_fused = _peak_extra(base)
    row: Dict[str, object] = {"size": name, "queries": P, "gallery": N, "L": L, "d": d, "dtype": "bfloat16"}
    scale_fused = P / p_fused
    row["fused_s"] = t_fused * scale_fused
    row["fused_timed_queries"] = p_fused
    # The fused op's own temporaries: its output ([p, N] float32) is not extra, the copy above is ours.
    row["fused_peak_extra_bytes"] = max(0, extra_fused - p_fused * N * 4)

    # The CUDA-core kernel (QACONV_EXT_CUDA_KERNEL=simple), on a slice of the queries.
    p_simple = min(p_fused, args.max_queries_simple)
    os.environ["QACONV_EXT_CUDA_KERNEL"] = "simple"
    try:
        t_simple = _time(lambda: fused_score(query[:p_simple], gallery, weight, bias, out[:p_simple]),
                         max(1, args.repeats // 2))
        simple_out = out[:p_simple].clone()
    finally:
        del os.environ["QACONV_EXT_CUDA_KERNEL"]
    row["simple_kernel_s"] = t_simple * P / p_simple
    row["simple_kernel_timed_queries"] = p_simple

    p_unf = min(P, args.max_queries_unfused)
    q_unf = query[:p_unf] if p_unf <= p_fused else _unit(p_unf, d, args.height, args.width, torch.bfloat16, 3)
    n_unf = min(N, args.max_gallery_unfused)
    out_unf = torch.empty(p_unf, n_unf, device=DEVICE)
    base = _reset_peak()
    t_unf = _time(lambda: unfused_score(q_unf, gallery[:n_unf], weight, bias, out_unf), max(1, args.repeats // 2))
    row["unfused_s"] = t_unf * (P / p_unf) * (N / n_unf)
    row["unfused_timed_pairs"] = p_unf * n_unf
    row["unfused_peak_extra_bytes"] = _peak_extra(base)
    # Check the two paths agree where both ran.
    common = min(p_unf, p_fused)
    err = (out[:common, :n_unf] - out_unf[:common]).abs().max().item()
    row["fused_vs_unfused_max_abs_diff"] = err
    fused_again = torch.empty(p_simple, N, device=DEVICE)
    fused_score(query[:p_simple], gallery, weight, bias, fused_again)
    row["tensor_core_vs_simple_max_abs_diff"] = (fused_again - simple_out).abs().max().item()
    del fused_again, simple_out
    del out_unf, q_unf

    # Dense GEMM of about the fused call's FLOPs per call (a square bf16 mm, repeated).
    m = args.mm_size
    a = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16)
    t_mm = _time(lambda: torch.mm(a, b), max(5, args.repeats))
    mm_tflops = 2.0 * m ** 3 / t_mm / 1e12
    del a, b
    pairs = float(P) * N
    row["fused_pairs_per_s"] = pairs / row["fused_s"]
    row["unfused_pairs_per_s"] = pairs / row["unfused_s"]
    row["fused_tflops"] = pairs * flop_pair / row["fused_s"] / 1e12
    row["unfused_tflops"] = pairs * flop_pair / row["unfused_s"] / 1e12
    row["dense_mm_tflops"] = mm_tflops
    row["fused_fraction_of_mm"] = row["fused_tflops"] / mm_tflops
    row["speedup_vs_unfused"] = row["unfused_s"] / row["fused_s"]
    row["speedup_vs_simple_kernel"] = row["simple_kernel_s"] / row["fused_s"]
    del gallery, query, out
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_training(args: argparse.Namespace) -> Dict[str, object]:
    import qaconv_ext
    from qaconv_ext import reference

    P, N = (int(x) for x in args.training_size.split(","))
    q = _unit(P, args.channels, args.height, args.width, torch.float32, 4).requires_grad_()
    g = _unit(N, args.channels, args.height, args.width, torch.float32, 5).requires_grad_()
    up = torch.randn(P, N, 2 * args.height * args.width, device=DEVICE)

    def fused():
        v, _ = qaconv_ext.qaconv_match(q, g, return_indices=True)
        return torch.autograd.grad(v, (q, g), up)

    def ref():
        return torch.autograd.grad(reference.qaconv_match(q, g), (q, g), up)

    t_fused = _time(fused, args.repeats)
    t_ref = _time(ref, args.repeats)
    fq, fg = fused()
    rq, rg = ref()
    rel = max(((fq - rq).norm() / rq.norm()).item(), ((fg - rg).norm() / rg.norm()).item())
    return {"queries": P, "classes": N, "pairs": P * N, "dtype": "float32", "fused_fwd_bwd_s": t_fused, "reference_fwd_bwd_s": t_ref,
            "speedup": t_ref / t_fused, "grad_rel_err_vs_reference": rel}


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="market,msmt")
    ap.add_argument("--height", type=int, default=24)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-queries-fused", type=int, default=4096,
                    help="queries timed for the fused op; larger sets are scaled from this slice")
    ap.add_argument("--max-queries-unfused", type=int, default=256)
    ap.add_argument("--max-queries-simple", type=int, default=256,
                    help="queries timed for the CUDA-core score kernel")
    ap.add_argument("--max-gallery-unfused", type=int, default=4096)
    ap.add_argument("--mm-size", type=int, default=8192, help="side of the dense bf16 GEMM timed as the peak")
    ap.add_argument("--training-size", default="32,751",
                    help="queries,classes of the training problem ('0' skips it)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only for smoke runs")
    add_output_args(ap, RESULT_NAME)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("bench_gallery: no CUDA device", file=sys.stderr)
        return 1
    import qaconv_ext

    if not qaconv_ext.native_available(DEVICE.type):
        print(f"bench_gallery: qaconv_ext was built without native {DEVICE.type} kernels", file=sys.stderr)
        return 1
    rows = [measure_size(s, *SIZES[s], args) for s in args.sizes.split(",") if s]
    training = measure_training(args) if args.training_size.strip() != "0" else None
    result = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "note": "times of slices scaled linearly to the full size where *_timed_* is below the full count",
        "gallery": rows, "training": training,
    }
    path = output_path(args, RESULT_NAME)
    if path:
        write_json(path, result)
    print(f"\n{result['device']}, torch {result['torch']}, CUDA {result['cuda']}")
    print("| size | pairs | fused s | CUDA-core s | unfused s | vs unfused | fused TFLOP/s | of dense mm "
          "| fused extra MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['size']} | {r['queries'] * r['gallery']:,} | {r['fused_s']:.2f} | {r['simple_kernel_s']:.2f} | "
              f"{r['unfused_s']:.2f} | {r['speedup_vs_unfused']:.2f}x | {r['fused_tflops']:.1f} | "
              f"{100 * r['fused_fraction_of_mm']:.0f}% | {r['fused_peak_extra_bytes'] / 2**20:.0f} |")
    t = training
    if t is not None:
        print(f"training {t['queries']} x {t['classes']} match+backward: fused {1e3 * t['fused_fwd_bwd_s']:.1f} ms, "
              f"reference {1e3 * t['reference_fwd_bwd_s']:.1f} ms ({t['speedup']:.1f}x), grad rel err "
              f"{t['grad_rel_err_vs_reference']:.1e}")
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
