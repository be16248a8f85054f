"""Search latency and peak memory against gallery size: exhaustive streaming search and the two-stage search.

A gallery index of random unit-norm maps at the real size (128 channels x 24 x 8, stored in float16: 48 KiB
a map) is grown on disk through the sizes asked for (default 10^3, 10^4, 10^5: the first is created, the
others appended), and at each size every method runs in a fresh worker process that opens the index and
searches for ``--queries`` random query maps, top 10:

* ``exhaustive``: every gallery map streamed through the fused op (exact);
* ``two-stage M``: the M best by the global descriptor, re-ranked by the fused op (approximate).

Per method: seconds per query (median of ``--repeats``, each a search of all queries), peak resident memory
of the worker (VmHWM) and its rise during the searches. The index files are read through the page cache
(written just before), so the times are compute, not disk. Sizes beyond those measured are extrapolated in
the JSON and the README with the arithmetic shown: time linear in the gallery size from the largest
measured size; memory unchanged except the records kept in memory.

    python benchmarks/bench_search.py                                  # 10^3 .. 10^5 (minutes; 4.7 GB of disk)
    python benchmarks/bench_search.py --sizes 1000,5000 --json /tmp/s.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from _machine import (  # benchmarks/_machine.py
    save_result,
    add_output_args,
    machine_record,
    reset_peak_rss,
    status_kib,
)

RESULT_NAME = "search_cpu.json"
EXTRAPOLATE = (10 ** 6, 10 ** 7)


def _maps(n: int, shape, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, *shape, generator=gen), dim=1)


def _grow(path: str, target: int, shape, block: int, seed: int) -> float:
    """Create or append random maps until the index at ``path`` holds ``target``; returns the seconds spent
    writing (generation excluded)."""
    import torch

    from qaconv_ext import QAConv
    from qaconv_ext.search import GalleryIndex

    spent = 0.0
    index = GalleryIndex.open(path) if os.path.exists(path) else None
    have = len(index) if index is not None else 0
    while have < target:
        n = min(block, target - have)
        maps = _maps(n, shape, seed + 1 + have)
        t = time.perf_counter()
        if index is None:
            torch.manual_seed(seed)
            index = GalleryIndex.create(path, QAConv(*shape).eval(), maps)
        else:
            index.append(maps)
        spent += time.perf_counter() - t
        have += n
    return spent


def _search(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from qaconv_ext.search import GalleryIndex

    if args.threads:
        torch.set_num_threads(args.threads)
    index = GalleryIndex.open(args.index)
    q = _maps(args.queries, index.map_shape, 10 ** 9 + args.seed)
    shortlist = args.shortlist or None
    base_kib = status_kib("VmRSS")
    exact = reset_peak_rss()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        index.search(q, k=args.k, shortlist=shortlist)
        times.append(time.perf_counter() - t)
    peak_kib = status_kib("VmHWM")
    return {"seconds_per_query": statistics.median(times) / args.queries,
            "seconds_all": times, "peak_mib": peak_kib / 1024, "rss_before_mib": base_kib / 1024,
            "rise_mib": (peak_kib - base_kib) / 1024, "peak_is_exact": exact}


def _run(index: str, shortlist: int, args: argparse.Namespace, repeats: int) -> Dict[str, Any]:
    if args.in_process:
        return _search(argparse.Namespace(**{**vars(args), "index": index, "shortlist": shortlist,
                                             "repeats": repeats}))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--index", index, "--shortlist", str(shortlist),
           "--queries", str(args.queries), "--k", str(args.k), "--repeats", str(repeats), "--seed", str(args.seed),
           "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit status {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _extrapolate(rows: List[Dict[str, Any]], shape, shortlists: List[int]) -> Dict[str, Any]:
    """Time linear in N from the largest measured size (t(N) = t(N0) * N / N0; for two-stage the part of
    the time that grows with N is the first pass, bounded above the same way), disk N x map bytes."""
    last = rows[-1]
    n0 = last["gallery"]
    map_bytes = 2 * shape[0] * shape[1] * shape[2]
    out: Dict[str, Any] = {"from_gallery": n0, "rule": "t(N) = t(N0) * N / N0 (an upper bound for two-stage, whose "
                                                      "re-ranking part does not grow with N); memory as measured; "
                                                      "disk N x (map + descriptor) bytes", "sizes": []}
    for n in EXTRAPOLATE:
        row: Dict[str, Any] = {"gallery": n, "disk_gib": n * (map_bytes + 4 * shape[0]) / 2 ** 30}
        for name, r in last["methods"].items():
            if "error" not in r:
                row[name] = {"seconds_per_query": r["seconds_per_query"] * n / n0}
        out["sizes"].append(row)
    return out


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000", help="gallery sizes, ascending (default: %(default)s)")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--height", type=int, default=24)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--queries", type=int, default=2, help="query maps per search (default: %(default)s)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shortlists", default="100,1000", help="two-stage shortlist sizes (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="two-stage repeats (exhaustive: 1) (default: %(default)s)")
    ap.add_argument("--block", type=int, default=2000, help="maps written per append while growing")
    ap.add_argument("--dir", default=None, help="where the index is written (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the searches in this process (quick checks: the peaks are then this process's)")
    add_output_args(ap, RESULT_NAME)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--shortlist", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_search(args)))
        return None

    sizes = [int(s) for s in args.sizes.split(",") if s]
    shortlists = [int(s) for s in args.shortlists.split(",") if s]
    shape = (args.channels, args.height, args.width)
    load_before = os.getloadavg()
    rows: List[Dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="bench_search.", dir=args.dir)
    try:
        path = os.path.join(tmp, "gallery.idx")
        for n in sizes:
            write_s = _grow(path, n, shape, args.block, args.seed)
            methods = {"exhaustive": _run(path, 0, args, 1)}
            for m in shortlists:
                if m < n:
                    methods[f"two-stage {m}"] = _run(path, m, args, args.repeats)
            disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            rows.append({"gallery": n, "disk_mib": disk / 2 ** 20, "write_s": write_s, "methods": methods})
            ex = methods["exhaustive"]
            line = f"  {n:>9,} maps ({disk / 2 ** 30:.2f} GiB)"
            for name, r in methods.items():
                line += (f" | {name}: {r['seconds_per_query'] * 1e3:,.0f} ms/query, peak {r['peak_mib']:.0f} MiB"
                         if "error" not in r else f" | {name}: failed: {r['error']}")
            print(line)
            if "error" not in ex:
                ex["pairs_per_s"] = n / ex["seconds_per_query"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    result = {
        "benchmark": "search_cpu",
        **machine_record(load_before, load_after),
        "problem": {"map": list(shape), "stored": "float16", "map_bytes": 2 * args.channels * args.height * args.width,
                    "queries_per_search": args.queries, "k": args.k, "maps": "random unit-norm"},
        "sizes": rows,
        "extrapolated": _extrapolate(rows, shape, shortlists) if rows else None,
        "notes": ("all methods in one process (--in-process)" if args.in_process else
                  "each method in a fresh process that opens the index") +
                 "; seconds per query = median search time / queries; peak = VmHWM; files in the page cache",
    }
    save_result(args, RESULT_NAME, result)
    return result


if __name__ == "__main__":
    main()
