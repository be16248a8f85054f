"""k-reciprocal re-ranking on CPU: time and peak memory of the dense and the memory-bounded sparse mode.

Distances are Euclidean (not squared) between random unit-norm 128-d features. Every method runs in its
own worker process on the same seeded inputs; peak memory is the resident-set high-water mark (VmHWM)
of that process, reported in total and above what the inputs already occupy. Methods:

* ``dense``: ``mode="dense"`` with ``dist_gg`` as an array;
* ``sparse``: ``mode="sparse"`` with ``dist_gg`` as an array;
* ``sparse-callable``: ``mode="sparse"`` with ``dist_gg(start, stop)`` computing row blocks from the
  features on the fly (the ``G x G`` matrix never exists).

    python benchmarks/bench_rerank.py                         # Market-1501 size: 3368 x 15913
    python benchmarks/bench_rerank.py --msmt                  # also sparse-callable at 11659 x 82161
    python benchmarks/bench_rerank.py --queries 500 --gallery 2000 --json /tmp/quick.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
from _machine import (add_output_args, machine_record, reset_peak_rss, save_result,  # benchmarks/_machine.py
                      status_kib)

RESULT_NAME = "rerank_cpu.json"
METHODS = ("dense", "sparse", "sparse-callable")




def _worker(args: argparse.Namespace) -> None:
    import torch

    from qaconv_ext.postprocess import k_reciprocal_rerank

    P, G = args.queries, args.gallery
    gen = torch.Generator().manual_seed(args.seed)
    feats = torch.nn.functional.normalize(torch.randn(P + G, args.dim, generator=gen), dim=1)
    qf, gf = feats[:P], feats[P:]

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (2.0 - 2.0 * a @ b.t()).clamp_min_(0.0).sqrt_()

    qg = dist(qf, gf)
    qq = dist(qf, qf)
    if args.worker == "sparse-callable":
        gg = lambda start, stop: dist(gf[start:stop], gf)  # noqa: E731
    else:
        gg = dist(gf, gf)
    mode = "dense" if args.worker == "dense" else "sparse"
    inputs_kib = status_kib("VmRSS")
    exact = reset_peak_rss()
    t0 = time.perf_counter()
    out = k_reciprocal_rerank(qg, qq, gg, mode=mode, progress=False)
    seconds = time.perf_counter() - t0
    peak_kib = status_kib("VmHWM")
    if args.out:
        np.save(args.out, out)
    print(json.dumps({
        "seconds": seconds,
        "peak_mib": peak_kib / 1024.0,
        "inputs_mib": inputs_kib / 1024.0,
        "peak_above_inputs_mib": (peak_kib - inputs_kib) / 1024.0,
        "output_mib": out.nbytes / 2 ** 20,
        "peak_is_exact": exact,
    }))


def _run(method: str, args: argparse.Namespace, queries: int, gallery: int, out: Optional[str]) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--queries", str(queries),
           "--gallery", str(gallery), "--dim", str(args.dim), "--seed", str(args.seed)]
    if out:
        cmd += ["--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])



def main(argv: Optional[List[str]] = None) -> Optional[Dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--msmt", action="store_true", help="also run sparse-callable at 11659 x 82161")
    add_output_args(ap, RESULT_NAME)
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return None

    methods = [m for m in args.methods.split(",") if m]
    results: Dict[str, Dict] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for m in methods:
            path = os.path.join(tmp, f"{m}.npy")
            results[m] = _run(m, args, args.queries, args.gallery, path)
            if "error" not in results[m]:
                outputs[m] = path
        base = outputs.get("dense")
        if base:
            ref = np.load(base)
            for m, path in outputs.items():
                if m != "dense":
                    results[m]["max_abs_diff_vs_dense"] = float(np.abs(np.load(path) - ref).max())
    msmt = None
    if args.msmt:
        msmt = _run("sparse-callable", args, 11659, 82161, None)
    load_after = os.getloadavg()

    N = args.queries + args.gallery
    result = {
        "benchmark": "rerank_cpu",
        **machine_record(load_before, load_after),
        "problem": {"queries": args.queries, "gallery": args.gallery, "items": N,
                    "features": f"random unit-norm, d={args.dim}", "distance": "Euclidean, not squared",
                    "k1": 20, "k2": 6, "lambda": 0.3, "dense_matrix_mib": 4 * N * N / 2 ** 20},
        "results": results,
        "notes": "one timed run per method, each in a fresh process; peak = VmHWM of that process",
    }
    if msmt is not None:
        result["msmt17_size_sparse_callable"] = {
            "queries": 11659, "gallery": 82161, "items": 93820,
            "dense_matrix_gib": 4 * 93820 ** 2 / 2 ** 30, **msmt}

    print(f"re-ranking {args.queries} x {args.gallery} (N = {N}), k1=20 k2=6 lambda=0.3")
    print(f"  {'method':<16}{'seconds':>10}{'peak MiB':>12}{'above inputs':>14}{'max|diff|':>12}")
    for m, r in results.items():
        if "error" in r:
            print(f"  {m:<16} failed: {r['error']}")
            continue
        diff = r.get("max_abs_diff_vs_dense")
        print(f"  {m:<16}{r['seconds']:>10.2f}{r['peak_mib']:>12.0f}{r['peak_above_inputs_mib']:>14.0f}"
              f"{'' if diff is None else f'{diff:.1e}':>12}")
    if msmt is not None:
        if "error" in msmt:
            print(f"  MSMT17 size sparse-callable failed: {msmt['error']}")
        else:
            print(f"  MSMT17 size (11659 x 82161) sparse-callable: {msmt['seconds']:.1f} s, "
                  f"peak {msmt['peak_mib'] / 1024:.2f} GiB")
    save_result(args, RESULT_NAME, result)
    return result


if __name__ == "__main__":
    main()
