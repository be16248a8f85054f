"""CPU matching throughput: the fused op against the chunked PyTorch reference, in one run.

Each method runs in its own worker process on the same seeded inputs, so its peak extra memory (the
resident-set high-water mark above what the inputs already occupy) is measured in isolation. Prints a
table and writes JSON with the machine and versions.

    python benchmarks/bench_match.py                      # 64 x 1024 pairs, L = 24x8, d = 128, float32
    python benchmarks/bench_match.py --queries 8 --gallery 128 --json /tmp/quick.json
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
from _machine import add_output_args, cpu_name, output_path, reset_peak_rss, status_kib  # benchmarks/_machine.py

RESULT_NAME = "cpu_match.json"

METHODS = {
    "fused score": ("qaconv_ext", "qaconv_score"),
    "reference score": ("qaconv_ext.ops.reference", "qaconv_score"),
    "fused match": ("qaconv_ext", "qaconv_match"),
    "reference match": ("qaconv_ext.ops.reference", "qaconv_match"),
}




def _worker(args: argparse.Namespace) -> Dict[str, float]:
    import importlib

    import torch

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
    add_output_args(p, RESULT_NAME)
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return {}

    import torch

    import qaconv_ext

    L = args.height * args.width
    results = {}
    for method in args.methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", method] + [
            f"--{k}={getattr(args, k)}" for k in ("queries", "gallery", "channels", "height", "width", "dtype",
                                                  "threads", "repeats", "seed")]
        print(f"running {method} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr}")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    flop_per_pair = 2.0 * L * L * args.channels
    for r in results.values():
        r["gflops"] = r["pairs_per_s"] * flop_per_pair / 1e9
    ratios = {}
    for op in ("score", "match"):
        f, ref = results.get(f"fused {op}"), results.get(f"reference {op}")
        if f and ref:
            ratios[op] = {"speedup": f["pairs_per_s"] / ref["pairs_per_s"],
                          "peak_memory_fraction": f["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9)}
    record = {
        "benchmark": "cpu_match",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "qaconv_ext": qaconv_ext.__version__, "python": platform.python_version(),
        "problem": {"queries": args.queries, "gallery": args.gallery, "pairs": args.queries * args.gallery,
                    "channels": args.channels, "height": args.height, "width": args.width, "L": L,
                    "dtype": args.dtype, "repeats": args.repeats},
        "results": results, "ratios": ratios,
    }
    print(f"\n{args.queries} x {args.gallery} pairs, L = {args.height}x{args.width}, d = {args.channels}, "
          f"{args.dtype}, {args.threads} threads, {record['device']}")
    print(f"{'method':<18}{'pairs/s':>12}{'GFLOP/s':>10}{'peak extra MiB':>16}")
    for name, r in results.items():
        print(f"{name:<18}{r['pairs_per_s']:>12,.0f}{r['gflops']:>10.1f}{r['peak_extra_mib']:>16.1f}")
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
