"""CPU matching throughput: the fused op against the chunked PyTorch reference, in one run.

Each method runs in its own worker process on the same seeded inputs, so its peak extra memory (the
resident-set high-water mark above what the inputs already occupy) is measured in isolation. The same
run measures the fused op on bfloat16 maps, the machine's float32 and bfloat16 GEMM rates (torch.mm,
the limit each precision can reach; every fused row reports the fraction of it), and a sweep over map
sizes (12 x 4, 24 x 8, 48 x 16) of the fused score in both precisions. Prints tables and writes JSON with
the machine, versions and load.

    python benchmarks/bench_match.py                      # 32 x 1024 pairs, L = 24x8, d = 128; d = 128 sweep
    python benchmarks/bench_match.py --full-sweep         # the sweep also at d = 64 and 512
    python benchmarks/bench_match.py --queries 8 --gallery 128 --sweep none --json /tmp/quick.json
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

# name -> (module, function, dtype: None for --dtype); the GEMM rows time torch.mm at --mm-size.
METHODS = {
    "fused score": ("qaconv_ext", "qaconv_score", None),
    "reference score": ("qaconv_ext.ops.reference", "qaconv_score", None),
    "fused match": ("qaconv_ext", "qaconv_match", None),
    "reference match": ("qaconv_ext.ops.reference", "qaconv_match", None),
    "fused score bfloat16": ("qaconv_ext", "qaconv_score", "bfloat16"),
    "fused match bfloat16": ("qaconv_ext", "qaconv_match", "bfloat16"),
    "gemm float32": ("torch", "mm", "float32"),
    "gemm bfloat16": ("torch", "mm", "bfloat16"),
    "map-size sweep": ("qaconv_ext", "qaconv_score", None),  # --full-sweep / --no-sweep
}
SWEEP = "map-size sweep"
SWEEP_MAPS = ((12, 4), (24, 8), (48, 16))
SWEEP_CHANNELS = {"none": (), "short": (128,), "full": (64, 128, 512)}


def _unit_maps(n: int, d: int, h: int, w: int, g, dtype):
    import torch

    return torch.nn.functional.normalize(torch.randn(n, d, h, w, generator=g), dim=1).to(dtype)


def _median_seconds(call, repeats: int) -> List[float]:
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def _gemm_worker(args: argparse.Namespace, dtype) -> Dict[str, float]:
    """torch.mm of two n x n matrices: the GEMM rate this precision reaches on this machine."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    n = args.mm_size
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    times = _median_seconds(lambda: torch.mm(a, b), max(args.repeats, 3))
    seconds = statistics.median(times)
    return {"seconds": seconds, "gflops": 2.0 * n ** 3 / seconds / 1e9, "size": n, "times": times}


def _sweep_worker(args: argparse.Namespace) -> List[Dict]:
    """The fused score at every map size of the sweep, float32 and bfloat16 on the same maps."""
    import torch

    import qaconv_ext

    rows = []
    for d in SWEEP_CHANNELS[args.sweep]:
        for h, w in SWEEP_MAPS:
            L = h * w
            flop_per_pair = 2.0 * L * L * d
            pairs = max(1, int(args.sweep_gflop * 1e9 / flop_per_pair))
            queries = min(16, pairs)
            gallery = max(1, pairs // queries)
            g = torch.Generator().manual_seed(args.seed)
            query, ref_gallery = _unit_maps(queries, d, h, w, g, torch.float32), _unit_maps(gallery, d, h, w, g,
                                                                                           torch.float32)
            weight = torch.randn(2 * L, generator=g)
            row = {"height": h, "width": w, "L": L, "channels": d, "queries": queries, "gallery": gallery}
            scores = {}
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                q, x = query.to(dtype), ref_gallery.to(dtype)
                call = lambda: qaconv_ext.qaconv_score(q, x, weight, 0.1)  # noqa: E731
                scores[name] = call()
                seconds = statistics.median(_median_seconds(call, args.repeats))
                rate = queries * gallery / seconds
                row[name] = {"seconds": seconds, "pairs_per_s": rate, "gflops": rate * flop_per_pair / 1e9}
            row["bfloat16_speedup"] = row["bfloat16"]["pairs_per_s"] / row["float32"]["pairs_per_s"]
            # what rounding the maps to bfloat16 does to the scores
            row["bfloat16_score_max_rel_diff"] = float((scores["bfloat16"] - scores["float32"]).abs().max() /
                                                       scores["float32"].abs().max())
            rows.append(row)
    return rows


def _worker(args: argparse.Namespace):
    import importlib

    import torch

    torch.set_num_threads(args.threads)
    if args.worker == SWEEP:
        return _sweep_worker(args)
    module, name, fixed_dtype = METHODS[args.worker]
    dtype = getattr(torch, fixed_dtype or args.dtype)
    if module == "torch":
        return _gemm_worker(args, dtype)
    g = torch.Generator().manual_seed(args.seed)
    query = _unit_maps(args.queries, args.channels, args.height, args.width, g, dtype)
    gallery = _unit_maps(args.gallery, args.channels, args.height, args.width, g, dtype)
    weight = torch.randn(2 * args.height * args.width, generator=g)
    fn = getattr(importlib.import_module(module), name)
    call = (lambda: fn(query, gallery, weight, 0.1)) if name == "qaconv_score" else (lambda: fn(query, gallery))

    with torch.no_grad():
        before = status_kib("VmRSS")
        exact_peak = reset_peak_rss()
        out = call()
        peak = status_kib("VmHWM")
        out_bytes = out.numel() * out.element_size()
        del out
        times = _median_seconds(call, args.repeats)
    seconds = statistics.median(times)
    extra = max(0.0, (peak - before) * 1024.0 - out_bytes)
    return {"seconds": seconds, "pairs_per_s": args.queries * args.gallery / seconds,
            "peak_extra_mib": extra / 2 ** 20, "output_mib": out_bytes / 2 ** 20,
            "peak_is_exact": exact_peak, "dtype": str(dtype).replace("torch.", ""), "times": times}


def _run_worker(args: argparse.Namespace, worker: str):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("queries", "gallery", "channels", "height", "width", "dtype", "threads", "repeats", "seed",
                  "mm_size", "sweep", "sweep_gflop")]
    print(f"running {worker} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{worker} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _percent(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _print_tables(args: argparse.Namespace, record: Dict) -> None:
    results, load = record["results"], record["load_average_before_after"]
    print(f"\n{args.queries} x {args.gallery} pairs, L = {args.height}x{args.width}, d = {args.channels}, "
          f"{args.threads} threads, {record['device']} ({record['cpu_isa']}), load average {load[0]} -> {load[1]}")
    print(f"{'method':<22}{'dtype':>10}{'pairs/s':>12}{'GFLOP/s':>10}{'of GEMM':>9}{'peak extra MiB':>16}")
    for name, r in results.items():
        if name.startswith("gemm"):
            print(f"{f'torch.mm {args.mm_size}^3':<22}{name[5:]:>10}{'':>12}{r['gflops']:>10.1f}")
        else:
            print(f"{name:<22}{r['dtype']:>10}{r['pairs_per_s']:>12,.0f}{r['gflops']:>10.1f}"
                  f"{_percent(r['fraction_of_gemm']):>9}{r['peak_extra_mib']:>16.1f}")
    for op, x in record["bfloat16_vs_float32_pairs_per_s"].items():
        print(f"{op}: bfloat16 maps give {x:.2f}x the pairs/s of {args.dtype} maps")
    if record["sweep"]:
        print(f"\nfused score, map-size sweep ({args.threads} threads): GFLOP/s, fraction of the GEMM rate")
        print(f"{'maps':<8}{'d':>5}{'pairs':>9}{'float32':>10}{'of GEMM':>9}{'bfloat16':>10}{'of GEMM':>9}"
              f"{'bf16/f32':>10}")
        for row in record["sweep"]:
            f32, b16 = row["float32"], row["bfloat16"]
            print(f"{row['height']}x{row['width']:<5}{row['channels']:>5}{row['queries'] * row['gallery']:>9}"
                  f"{f32['gflops']:>10.1f}{_percent(f32['fraction_of_gemm']):>9}{b16['gflops']:>10.1f}"
                  f"{_percent(b16['fraction_of_gemm']):>9}{row['bfloat16_speedup']:>9.2f}x")


def _gemm_limit(results: Dict[str, Dict], dtype: str) -> Optional[float]:
    r = results.get(f"gemm {dtype}")
    return r["gflops"] if r else None


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run the benchmark; returns the JSON record (also printed as a table and written to --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--gallery", type=int, default=1024)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--height", type=int, default=24)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--mm-size", type=int, default=2048, help="n of the n x n x n GEMMs that give the limits")
    p.add_argument("--full-sweep", dest="sweep", action="store_const", const="full", default="short",
                   help="sweep the map sizes at d = 64, 128 and 512 (default: d = 128 only)")
    p.add_argument("--no-sweep", dest="sweep", action="store_const", const="none", help="skip the map-size sweep")
    p.add_argument("--sweep", choices=list(SWEEP_CHANNELS), default="short", help=argparse.SUPPRESS)
    p.add_argument("--sweep-gflop", type=float, default=60.0,
                   help="work per sweep point and precision in GFLOP (sets its pair counts)")
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
    load_before = os.getloadavg()
    results, sweep = {}, []
    for method in args.methods:
        if method == SWEEP:
            sweep = _run_worker(args, method) if SWEEP_CHANNELS[args.sweep] else []
        else:
            results[method] = _run_worker(args, method)

    flop_per_pair = 2.0 * L * L * args.channels
    for name, r in results.items():
        if not name.startswith("gemm"):
            r["gflops"] = r["pairs_per_s"] * flop_per_pair / 1e9
            limit = _gemm_limit(results, r["dtype"])
            r["fraction_of_gemm"] = r["gflops"] / limit if limit else None
    for row in sweep:
        for dtype in ("float32", "bfloat16"):
            limit = _gemm_limit(results, dtype)
            row[dtype]["fraction_of_gemm"] = row[dtype]["gflops"] / limit if limit else None
    ratios, bf16_ratio = {}, {}
    for op in ("score", "match"):
        f, ref = results.get(f"fused {op}"), results.get(f"reference {op}")
        if f and ref:
            ratios[op] = {"speedup": f["pairs_per_s"] / ref["pairs_per_s"],
                          "peak_memory_fraction": f["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9)}
        f16 = results.get(f"fused {op} bfloat16")
        if f and f16:
            bf16_ratio[op] = f16["pairs_per_s"] / f["pairs_per_s"]
    # Small maps: each map size's GFLOP/s as a fraction of the 24 x 8 one, per precision and d.
    small_maps = {}
    for row in sweep:
        base = next((r for r in sweep if (r["height"], r["width"], r["channels"]) == (24, 8, row["channels"])), None)
        if base is not None:
            for dtype in ("float32", "bfloat16"):
                key = f"{row['height']}x{row['width']} d={row['channels']} {dtype}"
                small_maps[key] = row[dtype]["gflops"] / base[dtype]["gflops"]
    record = {
        "benchmark": "cpu_match",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "qaconv_ext": qaconv_ext.__version__, "python": platform.python_version(),
        "cpu_isa": torch.ops.qaconv_ext.cpu_isa() if hasattr(torch.ops.qaconv_ext, "cpu_isa") else None,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "problem": {"queries": args.queries, "gallery": args.gallery, "pairs": args.queries * args.gallery,
                    "channels": args.channels, "height": args.height, "width": args.width, "L": L,
                    "dtype": args.dtype, "repeats": args.repeats, "mm_size": args.mm_size},
        "results": results, "ratios": ratios, "bfloat16_vs_float32_pairs_per_s": bf16_ratio, "sweep": sweep,
        "sweep_fraction_of_24x8": small_maps,
    }
    _print_tables(args, record)
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
