"""An MSMT17-sized QAConv evaluation with k-reciprocal re-ranking that never holds gallery x gallery.

``evaluate_qaconv_features(..., rerank=True, rerank_mode="sparse")`` on 11,659 queries x 82,161 gallery
maps (MSMT17's test split: 3,060 identities, 15 cameras): the fused op scores query x gallery and query x
query, and re-ranking reads the gallery x gallery rows from the fused op in blocks (``score_rows``). The
dense mode would hold the 82,161^2 gallery scores (25 GiB) and the 93,820^2 combined distance matrix
(33 GiB). Feature maps are synthetic and small so that the run finishes on 2 CPU cores: ``--height 2
--width 2 --channels 16`` by default; each identity has a random base map and each image is that map
plus Gaussian noise, channel-normalised, so the metrics are not trivial. The head is a v2 QAConv head
with its initial weights.

Runs in a worker process; time per phase, the number of gallery rows the re-ranking asked for, and the
process's peak resident memory (VmHWM) go to the JSON file.

    python benchmarks/bench_eval_sparse.py --update-results       # the full size (about 30 min on 2 cores)
    python benchmarks/bench_eval_sparse.py --scale 0.03 --dense-check --json /tmp/small.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from _machine import (  # benchmarks/_machine.py
    save_result,
    add_output_args,
    machine_record,
    reset_peak_rss,
    status_kib,
)

RESULT_NAME = "eval_sparse_msmt17_cpu.json"
MSMT17 = {"queries": 11659, "gallery": 82161, "ids": 3060, "cameras": 15}


def _problem(args: argparse.Namespace) -> Dict[str, int]:
    s = float(args.scale)
    return {"queries": max(2, round(args.queries * s)), "gallery": max(2, round(args.gallery * s)),
            "ids": max(2, round(args.ids * s)), "cameras": args.cameras}


def _evaluate(args: argparse.Namespace, mode: str) -> Dict[str, Any]:
    import torch

    from qaconv_ext import QAConv
    from qaconv_ext.data import Record
    from qaconv_ext.evaluation import scoring

    if args.threads:
        torch.set_num_threads(args.threads)
    pb = _problem(args)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.channels, args.height, args.width)
    base = torch.randn(pb["ids"], *shape, generator=gen)

    def sample(n: int):
        pid = torch.randint(0, pb["ids"], (n,), generator=gen)
        cam = torch.randint(0, pb["cameras"], (n,), generator=gen)
        fea = torch.empty(n, *shape)
        for s in range(0, n, 65536):
            e = min(s + 65536, n)
            noise = torch.randn(e - s, *shape, generator=gen)
            fea[s:e] = torch.nn.functional.normalize(base[pid[s:e]] + args.noise * noise, dim=1)
        return fea, [Record("", int(p) + 1, int(c), None) for p, c in zip(pid.tolist(), cam.tolist())]

    qf, qr = sample(pb["queries"])
    gf, gr = sample(pb["gallery"])
    torch.manual_seed(args.seed)
    head = QAConv(*shape).eval()

    # count the gallery rows (and single entries) re-ranking asks for, and the time spent computing them
    asked = {"rows": 0, "entries": 0, "seconds": 0.0}
    make_rows = scoring.score_rows

    def counting_rows(*a: Any, **kw: Any):
        rows = make_rows(*a, **kw)

        def call(start: int, stop: int):
            t = time.perf_counter()
            out = rows(start, stop)
            asked["seconds"] += time.perf_counter() - t
            asked["rows"] += stop - start
            return out

        def entries(r, c):
            t = time.perf_counter()
            out = rows.entries(r, c)
            asked["seconds"] += time.perf_counter() - t
            asked["entries"] += len(r)
            return out

        call.entries = entries
        return call

    scoring.score_rows = counting_rows
    try:
        return _timed(scoring, head, qf, gf, qr, gr, mode, asked)
    finally:
        scoring.score_rows = make_rows


def _timed(scoring: Any, head: Any, qf: Any, gf: Any, qr: Any, gr: Any, mode: str, asked: Dict[str, Any]
           ) -> Dict[str, Any]:
    inputs_kib = status_kib("VmRSS")
    exact = reset_peak_rss()
    t0 = time.perf_counter()
    res = scoring.evaluate_qaconv_features(head, qf, gf, qr, gr, rerank=True, rerank_mode=mode,
                                           progress=False)
    seconds = time.perf_counter() - t0
    peak_kib = status_kib("VmHWM")
    rows = {name: {k: float(v) for k, v in m.items() if k != "cmc"} for name, m in res.rows.items()}
    sparse = mode == "sparse"
    return {
        "seconds": seconds,
        "gallery_rows_asked": asked["rows"] if sparse else None,
        "gallery_entries_asked": asked["entries"] if sparse else None,
        "gallery_rows_seconds": asked["seconds"] if sparse else None,
        "peak_mib": peak_kib / 1024.0,
        "inputs_mib": inputs_kib / 1024.0,
        "peak_above_inputs_mib": (peak_kib - inputs_kib) / 1024.0,
        "peak_is_exact": exact,
        "rows": rows,
    }


def _run(mode: str, args: argparse.Namespace) -> Dict[str, Any]:
    if args.in_process:
        return _evaluate(args, mode)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
    for key in ("queries", "gallery", "ids", "cameras", "channels", "height", "width", "noise", "scale", "seed",
                "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit status {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=MSMT17["queries"])
    ap.add_argument("--gallery", type=int, default=MSMT17["gallery"])
    ap.add_argument("--ids", type=int, default=MSMT17["ids"])
    ap.add_argument("--cameras", type=int, default=MSMT17["cameras"])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply queries, gallery and ids by this")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--height", type=int, default=2)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--noise", type=float, default=1.2, help="noise added to each identity's base map")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--dense-check", action="store_true",
                    help="also run rerank_mode='dense' (small sizes only: it holds gallery x gallery)")
    ap.add_argument("--in-process", action="store_true",
                    help="evaluate in this process (quick checks: the peaks are then this process's)")
    add_output_args(ap, RESULT_NAME)
    ap.add_argument("--worker", choices=("sparse", "dense"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_evaluate(args, args.worker)))
        return None

    pb = _problem(args)
    P, G = pb["queries"], pb["gallery"]
    load_before = os.getloadavg()
    results = {"sparse": _run("sparse", args)}
    if args.dense_check:
        results["dense"] = _run("dense", args)
    load_after = os.getloadavg()
    result: Dict[str, Any] = {
        "benchmark": "eval_sparse_cpu",
        **machine_record(load_before, load_after),
        "problem": {**pb, "map": [args.channels, args.height, args.width], "noise": args.noise, "seed": args.seed,
                    "scale": args.scale, "pairs_qg": P * G, "pairs_gg": G * G,
                    "dense_gg_scores_gib": 4 * G * G / 2 ** 30,
                    "dense_combined_distance_gib": 4 * (P + G) ** 2 / 2 ** 30,
                    "qg_matrix_gib": 4 * P * G / 2 ** 30},
        "results": results,
        "notes": ("both modes in one process (--in-process)" if args.in_process else "one run per mode in a fresh "
                  "process") + "; peak = VmHWM of that process (inputs included); "
                 "gallery_rows_asked / gallery_entries_asked: rows and single entries of the gallery x gallery "
                 "scores re-ranking had the fused op compute (each row once while streaming, then the "
                 "look-ups outside its kept neighbour lists)",
    }
    print(f"QAConv evaluation with re-ranking: {P} queries x {G} gallery, {pb['ids']} ids, {pb['cameras']} cameras, "
          f"maps {args.channels} x {args.height} x {args.width}")
    for mode, r in results.items():
        if "error" in r:
            print(f"  {mode}: failed: {r['error']}")
            continue
        extra = (f", gallery rows computed {r['gallery_rows_asked']} ({r['gallery_rows_asked'] / G:.2f} x G) and "
                 f"{r['gallery_entries_asked']} single entries in {r['gallery_rows_seconds']:.0f} s"
                 if r.get("gallery_rows_asked") is not None else "")
        print(f"  {mode}: {r['seconds']:.1f} s, peak {r['peak_mib'] / 1024:.2f} GiB{extra}")
        for name, m in r["rows"].items():
            print(f"    {name:<14} Rank-1 {100 * m['rank1']:5.1f}  mAP {100 * m['mAP']:5.1f}")
    if "dense" in results and "error" not in results["dense"] and "error" not in results["sparse"]:
        diffs = {name: max(abs(results["dense"]["rows"][name][k] - results["sparse"]["rows"][name][k])
                           for k in results["dense"]["rows"][name]) for name in results["dense"]["rows"]}
        result["max_metric_diff_dense_vs_sparse"] = diffs
        print(f"  largest metric difference dense vs sparse: {max(diffs.values()):.2e}")
    save_result(args, RESULT_NAME, result)
    return result


if __name__ == "__main__":
    main()
