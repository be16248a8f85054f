"""TLift at Market-1501 size: the vectorised ``qaconv_ext.postprocess.tlift`` (on the CPU, or the GPU with
``--device cuda``) against a per-probe loop with the same semantics on the CPU (the layout of the public
implementation: one sort of the co-occurrence block per probe and gallery camera), in one process run.

The loop is timed on a random subset of probes (each probe's work does not depend on the others, the
co-occurrence sets still come from all probes) and scaled linearly to the full probe set; the JSON says
so. The vectorised output is checked against the loop on those rows.

    python benchmarks/bench_tlift.py                       # 3368 x 15913, 6 cameras, 1.5 h and 4.5 h of times
    python benchmarks/bench_tlift.py --loop-probes 3368    # time the loop on every probe
    python benchmarks/bench_tlift.py --device cuda         # the vectorised version on the GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from qaconv_ext.postprocess import tlift
from _machine import add_output_args, cpu_name, machine_record, save_result  # benchmarks/_machine.py



def loop_tlift(score: np.ndarray, gal_cam: np.ndarray, gal_time: np.ndarray, prob_cam: np.ndarray,
               prob_time: np.ndarray, probes: np.ndarray, tau: float = 100, sigma: float = 200, K: int = 10,
               alpha: float = 0.2) -> np.ndarray:
    """Rows ``probes`` of the lifted scores, one probe and one gallery camera at a time."""
    out = np.zeros((probes.size, score.shape[1]))
    row_of = {int(p): n for n, p in enumerate(probes)}
    cams = np.unique(gal_cam)
    g_index = {g: np.flatnonzero(gal_cam == g) for g in cams}
    g_diff = {g: torch.from_numpy(gal_time[ix][:, None] - gal_time[ix][None, :]) for g, ix in g_index.items()}
    for c in np.unique(prob_cam[probes]):
        p_index = np.flatnonzero(prob_cam == c)
        near = np.abs(prob_time[p_index][:, None] - prob_time[p_index][None, :]) < tau
        timed = [n for n, p in enumerate(p_index) if int(p) in row_of]
        for g in cams:
            sub = score[p_index][:, g_index[g]]  # this camera pair's block, sliced once
            for n in timed:
                block = sub[np.flatnonzero(near[:, n])]
                ordered = np.sort(block, axis=None)
                thr = ordered[-K] if ordered.size > K else ordered[0]
                pivots = np.nonzero(block >= thr)[1]
                dt = g_diff[g][:, pivots]
                weight = torch.exp(-dt.pow(2) / sigma ** 2).mean(dim=1).numpy()
                i = p_index[n]
                out[row_of[int(i)], g_index[g]] = (weight + alpha) * score[i, g_index[g]]
    return out


def make_problem(num_query: int, num_gallery: int, num_cams: int, span: float, seed: int):
    rng = np.random.default_rng(seed)
    # sigmoid-like scores: mostly small, a few large (mean ~0.11)
    score = (rng.random((num_query, num_gallery), dtype=np.float32) ** 8).astype(np.float32)
    gal_cam = rng.integers(0, num_cams, num_gallery)
    prob_cam = rng.integers(0, num_cams, num_query)
    gal_time = rng.uniform(0, span, num_gallery)
    prob_time = rng.uniform(0, span, num_query)
    return score, gal_cam, gal_time, prob_cam, prob_time



def run_case(args: argparse.Namespace, span: float) -> Dict:
    score, gc, gt, pc, pt = make_problem(args.queries, args.gallery, args.cams, span, args.seed)
    inputs = (score, gc, gt, pc, pt)
    sync = (lambda: None)
    if args.device != "cpu":  # the vectorised version on the GPU: torch tensors in, a tensor out
        inputs = tuple(torch.as_tensor(x, device=args.device) for x in inputs)
        sync = torch.cuda.synchronize
    tlift(*inputs)  # warm-up
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = tlift(*inputs)
        sync()
        times.append(time.perf_counter() - t0)
    vec_s = statistics.median(times)
    out = out.cpu().numpy() if torch.is_tensor(out) else out

    rng = np.random.default_rng(args.seed + 1)
    n_loop = min(args.loop_probes, args.queries)
    probes = np.sort(rng.choice(args.queries, n_loop, replace=False))
    t0 = time.perf_counter()
    ref = loop_tlift(score, gc, gt, pc, pt, probes)
    loop_subset_s = time.perf_counter() - t0
    loop_s = loop_subset_s * args.queries / n_loop
    same_cam = pc[:, None] == pc[None, :]
    near = np.abs(pt[:, None] - pt[None, :]) < 100
    mean_set = float((same_cam & near).sum(axis=1).mean())
    return {
        "time_span_s": span,
        "mean_cooccurrence_set_size": mean_set,
        "vectorised": {"seconds_median": vec_s, "seconds_all": times},
        "loop": {
            "seconds_full_estimate": loop_s,
            "seconds_subset": loop_subset_s,
            "probes_timed": n_loop,
            "note": (f"loop timed on {n_loop} random probes of {args.queries} and scaled linearly"
                     if n_loop < args.queries else "loop timed on every probe"),
        },
        "speedup": loop_s / vec_s,
        "max_abs_diff_vs_loop": float(np.abs(out[probes].astype(np.float64) - ref).max()),
    }


def main(argv: Optional[List[str]] = None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--cams", type=int, default=6)
    ap.add_argument("--spans", default="5400,16200",
                    help="comma-separated time spans (s); time stamps are uniform over each")
    ap.add_argument("--loop-probes", type=int, default=300, help="probes timed in the loop baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the vectorised version runs (cpu, cuda)")
    add_output_args(ap, "tlift_cpu.json (tlift_gpu.json with --device cuda)")
    args = ap.parse_args(argv)
    gpu = args.device != "cpu"

    load_before = os.getloadavg()
    cases = [run_case(args, float(span)) for span in args.spans.split(",") if span]
    load_after = os.getloadavg()
    result = {
        "benchmark": "tlift_gpu" if gpu else "tlift_cpu",
        **machine_record(load_before, load_after, torch.cuda.get_device_name(args.device) if gpu else None),
        "cpu": cpu_name(),
        "cuda": torch.version.cuda,
        "problem": {
            "queries": args.queries, "gallery": args.gallery, "cameras": args.cams,
            "times": "uniform over the span, per sample", "scores": "float32, U(0,1)^8",
            "tau": 100, "sigma": 200, "K": 10, "alpha": 0.2,
        },
        "cases": cases,
    }
    print(f"TLift {args.queries} x {args.gallery}, {args.cams} cameras, vectorised on {result['device']}, "
          "loop on the CPU")
    print(f"  {'span (s)':>9}{'|R_i| mean':>12}{'vectorised s':>14}{'loop s':>10}{'speed-up':>10}{'max|diff|':>11}")
    for c in cases:
        print(f"  {c['time_span_s']:>9.0f}{c['mean_cooccurrence_set_size']:>12.1f}"
              f"{c['vectorised']['seconds_median']:>14.3f}{c['loop']['seconds_full_estimate']:>10.1f}"
              f"{c['speedup']:>9.1f}x{c['max_abs_diff_vs_loop']:>11.1e}")
    print(f"  ({cases[0]['loop']['note']})" if cases else "")
    save_result(args, "tlift_gpu.json" if gpu else "tlift_cpu.json", result)
    return result


if __name__ == "__main__":
    main()
