"""CPU matching throughput: the fused op against the chunked PyTorch reference, in one run.

Each method runs in its own worker process on the same seeded inputs, so its peak extra memory (the
resident-set high-water mark above what the inputs already occupy) is measured in isolation. The fused
op also runs on bfloat16 maps (--extra-dtypes), and the machine's torch.mm GEMM rates in float32 and
bfloat16 are measured in the same run, so every rate is also given as a fraction of the GEMM limit of
its dtype. Where the micro-kernel variant is avx512bf16 (VDPBF16PS), the bfloat16 rows are repeated with
the avx512 variant forced (--compare-kernels: the same channel-pair chain on float FMAs, the rate without
the instruction). An interleaved section (--interleaved-rounds) times, round after round in one process,
fused score float32, fused score bfloat16 (this CPU's kernel and each compared variant) and torch.mm
float32/bfloat16, and reports the medians of the per-round ratios, so a changing machine load affects
numerator and denominator alike. A sweep (--sweep, default on) times qaconv_score over map sizes 12x4,
24x8, 48x16 and d = 64, 128, 512, plus 2x2 maps with d = 16 (pairs/s of a small-map evaluation). Prints
tables and writes JSON with the machine, its CPU flags, versions, the micro-kernel variant and the load
average.

    python benchmarks/bench_match.py                      # 64 x 1024 pairs, L = 24x8, d = 128, float32
    python benchmarks/bench_match.py --queries 8 --gallery 128 --no-sweep --json /tmp/quick.json
    python benchmarks/bench_match.py --threads 2 --methods "fused score" --no-sweep \
        --json benchmarks/results/cpu_match_bf16.json   # the bfloat16 kernel's rows and ratios
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional
from _machine import add_output_args, cpu_flags, cpu_name, output_path, reset_peak_rss, status_kib  # benchmarks/_machine.py

RESULT_NAME = "cpu_match.json"

METHODS = {
    "fused score": ("qaconv_ext", "qaconv_score"),
    "reference score": ("qaconv_ext.ops.reference", "qaconv_score"),
    "fused match": ("qaconv_ext", "qaconv_match"),
    "reference match": ("qaconv_ext.ops.reference", "qaconv_match"),
}
# (height, width, channels) of the sweep; 2x2 maps with 16 channels stand for a small-map evaluation.
SWEEP = [(2, 2, 16)] + [(h, w, d) for (h, w) in ((12, 4), (24, 8), (48, 16)) for d in (64, 128, 512)]
SWEEP_SECONDS = 0.4  # aimed time per sweep measurement




def _worker(args: argparse.Namespace) -> Dict[str, float]:
    import importlib

    import torch

    if args.kernel:
        os.environ["QACONV_CPU_KERNEL"] = args.kernel

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.channels, args.height, args.width)
    query = torch.nn.functional.normalize(torch.randn(args.queries, *shape, generator=g), dim=1).to(dtype)
    gallery = torch.nn.functional.normalize(torch.randn(args.gallery, *shape, generator=g), dim=1).to(dtype)
    weight = torch.randn(2 * args.height * args.width, generator=g)
    module, name = METHODS[args.worker]
    fn = getattr(importlib.import_module(module), name)
    call = (lambda: fn(query, gallery, weight, 0.1)) if name == "qaconv_score" else (lambda: fn(query, gallery))

    with torch.no_grad():
        before = status_kib("VmRSS")
        exact_peak = reset_peak_rss()
        out = call()
        peak = status_kib("VmHWM")
        out_bytes = out.numel() * out.element_size()
        del out
        times: List[float] = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    extra = max(0.0, (peak - before) * 1024.0 - out_bytes)
    return {"seconds": seconds, "pairs_per_s": args.queries * args.gallery / seconds,
            "peak_extra_mib": extra / 2 ** 20, "output_mib": out_bytes / 2 ** 20,
            "peak_is_exact": exact_peak, "times": times}



def _gemm_worker(args: argparse.Namespace) -> Dict[str, float]:
    """torch.mm rates (GFLOP/s) per dtype: the limit a GEMM-bound op reaches on this machine.

    Measured with the run's thread count and with one thread; the limit ("gflops") is the larger of the
    first and threads x the second (on a loaded machine a multi-threaded GEMM's barriers lose more than
    independent per-thread work does, so the per-thread rate scaled up is the fairer bound)."""
    import torch

    out = {}
    for threads in sorted({args.threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for name, rec in _gemm_rates(args).items():
            entry = out.setdefault(name, {"shapes": {}, "gflops": 0.0})
            entry["shapes" if threads == args.threads else "shapes_1_thread"] = rec["shapes"]
            entry["gflops"] = max(entry["gflops"], rec["gflops"] * (args.threads if threads == 1 else 1))
    return out


def _gemm_rates(args: argparse.Namespace) -> Dict[str, Dict]:
    import torch

    L, d = args.height * args.width, args.channels
    out = {}
    for name in args.gemm_dtypes:
        dtype = getattr(torch, name)
        shapes = {"square 512": (512, 512, 512), f"L x d x 8L ({L}, {d}, {8 * L})": (L, d, 8 * L)}
        rates = {}
        for label, (m, k, n) in shapes.items():
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            c = torch.empty(m, n, dtype=dtype)
            torch.mm(a, b, out=c)
            t0 = time.perf_counter()
            reps = 0
            while time.perf_counter() - t0 < 0.05:
                torch.mm(a, b, out=c)
                reps += 1
            reps = max(1, int(reps * SWEEP_SECONDS / 0.05 / 3))
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    torch.mm(a, b, out=c)
                best = min(best, (time.perf_counter() - t0) / reps)
            rates[label] = 2.0 * m * k * n / best / 1e9
        out[name] = {"shapes": rates, "gflops": max(rates.values())}
    return out


INTERLEAVED_SAMPLE_S = 0.15  # aimed time of one timing sample in the interleaved section


def _rate(call, work: float) -> float:
    """``work`` per second of ``call``: the median of 3 samples, each a loop of calls lasting about
    INTERLEAVED_SAMPLE_S (so short and long calls see the machine's load over windows of the same length)."""
    call()
    t0 = time.perf_counter()
    call()
    reps = max(1, int(INTERLEAVED_SAMPLE_S / max(time.perf_counter() - t0, 1e-6)))
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        samples.append(reps * work / (time.perf_counter() - t0))
    return statistics.median(samples)


def _interleaved_worker(args: argparse.Namespace) -> Dict:
    """Rounds of fused score float32, fused score bfloat16 (this CPU's kernel, then each of
    --compare-kernels forced) and torch.mm float32 / bfloat16, one after the other; rates per round and the
    medians of the per-round ratios. torch.mm is timed at the run's threads ("torch.mm <dtype>", the
    better of two shapes) and as the GEMM limit of _gemm_worker (also threads x the one-thread rate)."""
    import torch

    import qaconv_ext

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.channels, args.height, args.width)
    P, N = min(args.queries, 8), min(args.gallery, 256)
    q = torch.nn.functional.normalize(torch.randn(P, *shape, generator=g), dim=1)
    gal = torch.nn.functional.normalize(torch.randn(N, *shape, generator=g), dim=1)
    w = torch.randn(2 * args.height * args.width, generator=g)
    L, d = args.height * args.width, args.channels
    flop_per_pair = 2.0 * L * L * d
    mm_shapes = {"square 512": (512, 512, 512), f"L x d x 8L ({L}, {d}, {8 * L})": (L, d, 8 * L)}
    mm_in = {dt: [(torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)) for (m, k, n) in mm_shapes.values()]
             for dt in (torch.float32, torch.bfloat16)}
    own = os.environ.get("QACONV_CPU_KERNEL")  # this CPU's kernel, or the one the caller forced

    def score(dtype, kernel=None):
        if kernel is not None:
            os.environ["QACONV_CPU_KERNEL"] = kernel
        qq, gg = q.to(dtype), gal.to(dtype)
        try:
            return _rate(lambda: qaconv_ext.qaconv_score(qq, gg, w, 0.1), P * N * flop_per_pair / 1e9)
        finally:
            if own is None:
                os.environ.pop("QACONV_CPU_KERNEL", None)
            else:
                os.environ["QACONV_CPU_KERNEL"] = own

    def mm(dtype, threads):
        torch.set_num_threads(threads)
        best = max(_rate(lambda: torch.mm(a, b), 2.0 * m * k * n / 1e9)
                   for (m, k, n), (a, b) in zip(mm_shapes.values(), mm_in[dtype]))
        torch.set_num_threads(args.threads)
        return best

    kernel = qaconv_ext.cpu_kernel()
    labels = ["fused score float32", f"fused score bfloat16 [{kernel}]"] + [
        f"fused score bfloat16 [{k}]" for k in args.compare_kernels] + [
        "torch.mm float32", "torch.mm bfloat16", "torch.mm float32 limit", "torch.mm bfloat16 limit"]
    rounds = []
    for _ in range(args.interleaved_rounds):
        r = [score(torch.float32), score(torch.bfloat16)] + [score(torch.bfloat16, k) for k in args.compare_kernels]
        mm_run = [mm(torch.float32, args.threads), mm(torch.bfloat16, args.threads)]
        mm_one = [args.threads * mm(torch.float32, 1), args.threads * mm(torch.bfloat16, 1)]
        r += mm_run + [max(a, b) for a, b in zip(mm_run, mm_one)]
        rounds.append(dict(zip(labels, r)))
    f32, bf16 = labels[0], labels[1]
    ratios = {
        "bfloat16 / float32 fused score": [r[bf16] / r[f32] for r in rounds],
        "fused bfloat16 / torch.mm bfloat16": [r[bf16] / r["torch.mm bfloat16"] for r in rounds],
        "fused bfloat16 / torch.mm bfloat16 limit": [r[bf16] / r["torch.mm bfloat16 limit"] for r in rounds],
        "fused float32 / torch.mm float32": [r[f32] / r["torch.mm float32"] for r in rounds],
        "fused float32 / torch.mm float32 limit": [r[f32] / r["torch.mm float32 limit"] for r in rounds],
        "torch.mm bfloat16 / torch.mm float32": [r["torch.mm bfloat16"] / r["torch.mm float32"] for r in rounds],
    }
    for k in args.compare_kernels:
        other = f"fused score bfloat16 [{k}]"
        ratios[f"{other} / float32 fused score"] = [r[other] / r[f32] for r in rounds]
        ratios[f"{bf16} / {other}"] = [r[bf16] / r[other] for r in rounds]
    return {
        "problem": {"queries": P, "gallery": N, "channels": d, "height": args.height, "width": args.width,
                    "torch_mm_shapes": list(mm_shapes)},
        "kernel": kernel, "rounds": len(rounds),
        "gflops_median": {k: statistics.median(r[k] for r in rounds) for k in labels},
        "pairs_per_s_median": {k: statistics.median(r[k] for r in rounds) * 1e9 / flop_per_pair
                               for k in labels if k.startswith("fused")},
        "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_min_max": {k: [min(v), max(v)] for k, v in ratios.items()},
        "gflops_per_round": rounds,
    }


def _sweep_worker(args: argparse.Namespace) -> List[Dict]:
    """qaconv_score pairs/s over the SWEEP map sizes, per dtype (the pair count aimed at SWEEP_SECONDS)."""
    import torch

    import qaconv_ext

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for h, w, d in SWEEP:
        L = h * w
        flop = 2.0 * L * L * d
        for name in args.sweep_dtypes:
            dtype = getattr(torch, name)
            P = 64 if L <= 4 else 16
            N = max(8, int(min(2e6 / P, 60e9 * SWEEP_SECONDS / flop / P)))  # ~60 GFLOP/s, at most 2 M pairs
            q = torch.nn.functional.normalize(torch.randn(P, d, h, w, generator=g), dim=1).to(dtype)
            gal = torch.nn.functional.normalize(torch.randn(N, d, h, w, generator=g), dim=1).to(dtype)
            weight = torch.randn(2 * L, generator=g)
            qaconv_ext.qaconv_score(q, gal[: max(1, N // 8)], weight)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                qaconv_ext.qaconv_score(q, gal, weight)
                times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            rows.append({"map": f"{h}x{w}", "channels": d, "dtype": name, "pairs": P * N,
                         "seconds": sec, "pairs_per_s": P * N / sec, "gflops": P * N * flop / sec / 1e9})
    return rows


def _run_worker(kind: str, args: argparse.Namespace, extra: List[str]):
    cmd = [sys.executable, os.path.abspath(__file__), f"--{kind}"] + extra + [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("queries", "gallery", "channels", "height", "width",
                                                                "threads", "repeats", "seed", "interleaved_rounds")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {' '.join(extra)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the benchmark; returns the JSON record (also printed as a table and written to --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--gallery", type=int, default=1024)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--height", type=int, default=24)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--extra-dtypes", nargs="*", default=["bfloat16"],
                   choices=["bfloat16", "float16", "float32", "float64"],
                   help="also run the fused methods on maps of these dtypes (rows 'fused score <dtype>')")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="time qaconv_score over the map-size sweep (12x4, 24x8, 48x16 x d 64/128/512; 2x2 d 16)")
    p.add_argument("--sweep-dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--gemm-dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--compare-kernels", nargs="*", default=None,
                   help="micro-kernel variants (QACONV_CPU_KERNEL) to rerun the bfloat16 rows with "
                        "(default: avx512 where this CPU's kernel is avx512bf16, else none)")
    p.add_argument("--interleaved-rounds", type=int, default=7,
                   help="rounds of the interleaved float32/bfloat16/torch.mm timing (0: skip)")
    add_output_args(p, RESULT_NAME)
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--kernel", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gemm-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sweep-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interleaved-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return {}
    if args.interleaved_worker:
        print(json.dumps(_interleaved_worker(args)))
        return {}
    if args.gemm_worker:
        print(json.dumps(_gemm_worker(args)))
        return {}
    if args.sweep_worker:
        print(json.dumps(_sweep_worker(args)))
        return {}

    import torch

    import qaconv_ext
    from qaconv_ext.ops import _library

    kernel = qaconv_ext.cpu_kernel() if _library.NATIVE else None
    if args.compare_kernels is None:
        args.compare_kernels = ["avx512"] if kernel == "avx512bf16" else []
    load_before = os.getloadavg()
    L = args.height * args.width
    results = {}
    runs = [(m, args.dtype, None) for m in args.methods]
    runs += [(m, dt, None) for dt in args.extra_dtypes if dt != args.dtype for m in args.methods
             if m.startswith("fused")]
    runs += [(m, dt, k) for k in args.compare_kernels for (m, dt, _) in list(runs)
             if dt == "bfloat16" and m.startswith("fused")]
    for method, dtype, forced in runs:
        label = method if dtype == args.dtype else f"{method} {dtype}"
        label += f" [{forced}]" if forced else ""
        print(f"running {label} ...", file=sys.stderr, flush=True)
        results[label] = _run_worker("worker", args, [method, f"--dtype={dtype}"] +
                                     ([f"--kernel={forced}"] if forced else []))
        results[label]["dtype"] = dtype
        results[label]["kernel"] = forced or kernel
    print("measuring torch.mm ...", file=sys.stderr, flush=True)
    gemm = _run_worker("gemm-worker", args, ["--gemm-dtypes", *args.gemm_dtypes])
    interleaved = None
    if args.interleaved_rounds > 0 and _library.NATIVE:
        print("timing float32 / bfloat16 / torch.mm interleaved ...", file=sys.stderr, flush=True)
        interleaved = _run_worker("interleaved-worker", args, ["--compare-kernels", *args.compare_kernels])
    sweep = []
    if args.sweep:
        print("running the map-size sweep ...", file=sys.stderr, flush=True)
        sweep = _run_worker("sweep-worker", args, ["--sweep-dtypes", *args.sweep_dtypes])
    load_after = os.getloadavg()

    def fraction(dtype: str, gflops: float) -> Optional[float]:
        limit = gemm.get(dtype, {}).get("gflops")
        return gflops / limit if limit else None

    flop_per_pair = 2.0 * L * L * args.channels
    for r in results.values():
        r["gflops"] = r["pairs_per_s"] * flop_per_pair / 1e9
        r["fraction_of_mm"] = fraction(r["dtype"], r["gflops"])
    for r in sweep:
        r["fraction_of_mm"] = fraction(r["dtype"], r["gflops"])
    ratios = {}
    for op in ("score", "match"):
        f, ref = results.get(f"fused {op}"), results.get(f"reference {op}")
        if f and ref:
            ratios[op] = {"speedup": f["pairs_per_s"] / ref["pairs_per_s"],
                          "peak_memory_fraction": f["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9)}
    record = {
        "benchmark": "cpu_match",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "qaconv_ext": qaconv_ext.__version__, "python": platform.python_version(),
        "cpu_kernel": kernel,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "problem": {"queries": args.queries, "gallery": args.gallery, "pairs": args.queries * args.gallery,
                    "channels": args.channels, "height": args.height, "width": args.width, "L": L,
                    "dtype": args.dtype, "repeats": args.repeats},
        "results": results, "ratios": ratios,
        "torch_mm_gflops": gemm, "interleaved": interleaved, "sweep": sweep,
    }
    print(f"\n{args.queries} x {args.gallery} pairs, L = {args.height}x{args.width}, d = {args.channels}, "
          f"{args.dtype}, {args.threads} threads, {record['device']}")
    print(f"{'method':<36}{'pairs/s':>12}{'GFLOP/s':>10}{'of mm':>8}{'peak extra MiB':>16}")
    pct = lambda f: f"{100 * f:.0f}%" if f is not None else "-"  # noqa: E731
    for name, r in results.items():
        print(f"{name:<36}{r['pairs_per_s']:>12,.0f}{r['gflops']:>10.1f}{pct(r['fraction_of_mm']):>8}"
              f"{r['peak_extra_mib']:>16.1f}")
    for name, r in gemm.items():
        print(f"torch.mm {name}: limit {r['gflops']:.1f} GFLOP/s; {args.threads} threads: "
              f"{', '.join(f'{k}: {v:.1f}' for k, v in r['shapes'].items())}; 1 thread: "
              f"{', '.join(f'{k}: {v:.1f}' for k, v in r.get('shapes_1_thread', {}).items())}")
    if interleaved:
        pr = interleaved["problem"]
        print(f"\ninterleaved, {interleaved['rounds']} rounds, {pr['queries']} x {pr['gallery']} pairs "
              f"(median GFLOP/s; ratios: median of the rounds' [min, max])")
        for name, v in interleaved["gflops_median"].items():
            print(f"  {name:<44}{v:>10.1f}")
        for name, v in interleaved["ratio_median"].items():
            lo, hi = interleaved["ratio_min_max"][name]
            print(f"  {name:<60}{v:>7.3f}  [{lo:.3f}, {hi:.3f}]")
    if sweep:
        print(f"\nsweep (qaconv_score), kernel {record['cpu_kernel']}, load average "
              f"{record['load_average_before_after']}")
        print(f"{'map':<8}{'d':>5}{'dtype':>10}{'pairs/s':>14}{'GFLOP/s':>10}{'of mm':>8}")
        for r in sweep:
            print(f"{r['map']:<8}{r['channels']:>5}{r['dtype']:>10}{r['pairs_per_s']:>14,.0f}{r['gflops']:>10.1f}"
                  f"{pct(r['fraction_of_mm']):>8}")
    for op, r in ratios.items():
        print(f"{op}: fused is {r['speedup']:.2f}x the reference's pairs/s with "
              f"{100 * r['peak_memory_fraction']:.1f}% of its peak extra memory")
    path = output_path(args, RESULT_NAME)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(record, fh, indent=2)
        print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
