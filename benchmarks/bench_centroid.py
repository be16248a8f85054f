"""Centroid two-stage search against the descriptor two-stage and the exhaustive search, one run, one model.

Quality (real maps of a trained model): the synthetic network's test gallery (``domain_b``) and the same
gallery with every other rendered image as distractors (identity 0), indexed with ``--checkpoint``. Per
gallery, the 144 queries are searched

* exhaustively (the exact QAConv ranking, the reference),
* by the descriptor two-stage (average-pooled map, cosine; the best M re-ranked exactly), and
* by the centroid two-stage for each codebook size K (each map stored as ``h * w`` uint16 centroid ids;
  the best M by the centroid score, re-ranked exactly).

Reported per method: recall of the exact top 10 (share of the exhaustive top 10 in the method's top 10),
Rank-1 and mAP (Market-1501 protocol; a two-stage ranking is its re-ranked shortlist, then the rest of the
gallery by the first-stage score), ms per query (queries one at a time; median of ``--repeats``), bytes per
map of what the first stage reads, and for each K the codebook's training and encoding time.

Scale (``--scales``, default 10^5 and 10^6 maps): codes drawn at random (uniform ids; the kernel's cost does
not depend on their values) are scored by the candidate stage for one query at a time (measured: ms per
query, peak resident memory, bytes of codes in RAM); the exact stage re-ranks M = 1 % of the maps, read from
the real index's file (indices taken modulo its size: measured, with the reads); the exhaustive search is
the measured per-map rate of the real gallery's exhaustive search times the size (extrapolated, linear: it
streams the gallery). The speed-up at each size is extrapolated exhaustive / (measured candidate stage +
measured exact stage).

    python benchmarks/bench_centroid.py --update-results            # the demo's model, runs/demo/qaconv.pt
    python benchmarks/bench_centroid.py --scale-only 2048 --json scale.json   # the scale timing alone
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import add_output_args, machine_record, reset_peak_rss, save_result, status_kib  # noqa: E402
from bench_two_stage import _ranking_distance, _timed, _two_stage_order, search_bench_parser, synthetic_test_set  # noqa: E402  (same rules)

RESULT_NAME = "centroid_synthetic.json"


def _recall(order, exact_top, k: int) -> float:
    import numpy as np

    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(order[:, :k], exact_top)]))


def _cpu_flags() -> List[str]:
    with open("/proc/cpuinfo") as fh:
        return sorted(set(re.findall(r"\b(avx512_bf16|avx512f|avx2)\b", fh.read())))


def _row(name: str, r: Dict[str, Any]) -> str:
    ms = f"{1e3 * r['seconds_per_query']:>10.1f}" if "seconds_per_query" in r else f"{'-':>10}"
    sp = f"{r['speedup']:>8.1f}x" if "speedup" in r else f"{'-':>9}"
    return (f"  {name:<26}{100 * r['recall_top10']:>9.1f}%{100 * r['rank1']:>8.1f}{100 * r['mAP']:>8.1f}{ms}{sp}"
            f"{r.get('first_stage_bytes_per_map', 0):>8}")


def evaluate(name: str, index: Any, q_maps: Any, query: List[Any], gallery: List[Any], shortlists: List[int],
             codebooks: List[int], k: int, repeats: int, timed: int) -> Dict[str, Any]:
    import numpy as np
    import torch

    from qaconv_ext.evaluation import rank_metrics
    from qaconv_ext.ops import centroid_score, centroid_table
    from qaconv_ext.search import global_descriptors

    N, P = len(index), q_maps.shape[0]
    d, h, w = index.map_shape
    timed = min(timed, P)
    t0 = time.perf_counter()
    _, full_i = index.search(q_maps, k=N)  # the exact ranking of the whole gallery
    exact_all_s = time.perf_counter() - t0
    exact_top = full_i[:, :k]
    out: Dict[str, Any] = {"gallery": N, "queries": P, "map_shape": [d, h, w],
                           "map_bytes_float16": 2 * d * h * w, "methods": {}}

    def one_by_one(**kw: Any) -> None:
        for p in range(timed):
            index.search(q_maps[p:p + 1], k=k, **kw)

    t_ex = _timed(one_by_one, repeats) / timed
    m = rank_metrics(_ranking_distance(full_i, N), query, gallery)
    out["methods"]["exhaustive"] = {"recall_top10": 1.0, "rank1": m["rank1"], "mAP": m["mAP"],
                                    "seconds_per_query": t_ex, "speedup": 1.0,
                                    "first_stage_bytes_per_map": 2 * d * h * w}
    out["exhaustive_all_queries_s"] = exact_all_s
    out["exhaustive_seconds_per_map_per_query"] = t_ex / N

    def two_stage(label: str, first_sim: Any, method: str, bytes_per_map: int, extra: Dict[str, Any]) -> None:
        by_first = torch.sort(first_sim, dim=1, descending=True, stable=True).indices
        mf = rank_metrics(_ranking_distance(by_first, N), query, gallery)
        out["methods"][f"{label} only"] = {"recall_top10": _recall(by_first, exact_top, k), "rank1": mf["rank1"],
                                           "mAP": mf["mAP"], **extra}
        for M in shortlists:
            if M >= N:
                continue
            _, short_i = index.search(q_maps, k=M, shortlist=M, method=method)
            order = _two_stage_order(short_i, first_sim)
            ms = rank_metrics(_ranking_distance(order, N), query, gallery)
            t = _timed(lambda: one_by_one(shortlist=M, method=method), repeats) / timed
            out["methods"][f"{label} M={M}"] = {
                "recall_top10": _recall(order, exact_top, k), "rank1": ms["rank1"], "mAP": ms["mAP"],
                "shortlist_share": M / N, "seconds_per_query": t, "speedup": t_ex / t,
                "first_stage_bytes_per_map": bytes_per_map}

    desc = torch.from_numpy(np.array(index.descriptors()))
    two_stage("descriptor", global_descriptors(q_maps) @ desc.t(), "descriptor", 4 * d, {})
    w_head, b_head = index.folded_head()
    for K in codebooks:
        t0 = time.perf_counter()
        index.train_codebook(K)
        train_s = time.perf_counter() - t0
        codes = torch.from_numpy(np.concatenate(list(index.iter_codes())).view(np.uint16))
        sim = centroid_score(centroid_table(index.centroids(), q_maps), codes, w_head, b_head)
        cb = index.manifest["codebook"]
        two_stage(f"centroid K={K}", sim, "centroid", 2 * h * w,
                  {"codebook_train_and_encode_s": train_s, "train_error": cb["train_error"], "sample": cb["sample"],
                   "codebook_bytes": 4 * K * d})
    print(f"{name}: {P} queries, {N} gallery maps")
    print(f"  {'method':<26}{'recall@10':>10}{'Rank-1':>8}{'mAP':>8}{'ms/query':>10}{'speed-up':>9}{'B/map':>8}")
    for meth, r in out["methods"].items():
        print(_row(meth, r))
    return out


def scale(index: Any, q_maps: Any, sizes: List[int], K: int, share: float, repeats: int,
          per_map_exhaustive: Optional[float] = None) -> Dict[str, Any]:
    """Candidate-stage latency on random codes of ``sizes`` maps, the measured exact stage of ``share`` of
    them, and the extrapolated exhaustive search: ``per_map_exhaustive`` seconds per map, or (``None``) the
    index's exhaustive search measured right before each size, so each ratio comes from one stretch of time."""
    import numpy as np
    import torch

    from qaconv_ext.search import centroid_topk, rerank_shortlist

    d, h, w = index.map_shape
    L = h * w
    weight, bias = index.folded_head()
    centroids = index.centroids()
    if centroids.shape[0] != K:
        raise SystemExit(f"the index's codebook has {centroids.shape[0]} centroids, not {K}")
    q = q_maps[:1]
    out: Dict[str, Any] = {"K": K, "shortlist_share": share, "sizes": {}}
    real = len(index)
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        codes = torch.randint(0, K, (n, L), generator=gen, dtype=torch.int32).to(torch.uint16).numpy()
        chunks = [codes[s:s + (1 << 16)] for s in range(0, n, 1 << 16)]
        M = max(10, int(round(share * n)))
        rss_before = status_kib("VmRSS")
        exact_peak = reset_peak_rss()
        t_cand = _timed(lambda: centroid_topk(q, chunks, centroids, weight, bias, M), repeats)
        peak = status_kib("VmHWM")
        _, cand = centroid_topk(q, chunks, centroids, weight, bias, M)

        def fetch(ids: Any) -> Any:  # the M candidates' maps: real maps of the index, read from its file
            return index.read_maps(np.asarray(ids) % real)

        t_exact = _timed(lambda: rerank_shortlist(q, cand, fetch, weight, bias, 10), repeats)
        rate = per_map_exhaustive
        if rate is None:
            rate = _timed(lambda: index.search(q, k=10), repeats) / real
        t_ex = rate * n
        out["sizes"][str(n)] = {
            "maps": n, "shortlist": M, "exhaustive_s_per_map": rate, "candidate_stage_s": t_cand,
            "exact_stage_s": t_exact,
            "exact_stage_maps_read": int(cand.shape[1]),
            "two_stage_s": t_cand + t_exact, "exhaustive_s_extrapolated": t_ex,
            "speedup_extrapolated": t_ex / (t_cand + t_exact),
            "codes_bytes_in_ram": int(codes.nbytes), "codes_bytes_per_map": 2 * L,
            "rss_before_kib": rss_before, "candidate_stage_peak_rss_kib": peak,
            "candidate_stage_peak_above_codes_kib": peak - rss_before, "peak_rss_exact": exact_peak}
        r = out["sizes"][str(n)]
        print(f"  {n:>9} maps: candidates {1e3 * t_cand:8.1f} ms, exact stage (M={M}, "
              f"{r['exact_stage_maps_read']} maps read) {1e3 * t_exact:8.1f} ms, exhaustive (extrapolated) "
              f"{t_ex:8.1f} s -> {r['speedup_extrapolated']:.1f}x; codes {codes.nbytes / 2 ** 20:.0f} MiB, "
              f"peak RSS +{(peak - rss_before) / 1024:.0f} MiB")
        del codes, chunks
    return out


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    ap = search_bench_parser(__doc__, "10,25,50,100,250,500", 12)
    ap.add_argument("--codebooks", default="256,1024,4096")
    ap.add_argument("--scales", default="100000,1000000")
    ap.add_argument("--scale-codebook", type=int, default=4096, help="K of the scale timing (default: %(default)s)")
    ap.add_argument("--scale-share", type=float, default=0.01, help="M / N at scale (default: %(default)s)")
    ap.add_argument("--no-test-gallery", action="store_true", help="only the gallery with distractors")
    ap.add_argument("--no-distractors", action="store_true", help="only the test gallery (and scale on it)")
    ap.add_argument("--scale-only", type=int, default=0, metavar="R",
                    help="only the scale timing, on an index of R random unit maps of the model's map shape (its "
                         "exhaustive rate measured next to each size; timing does not depend on the values)")
    add_output_args(ap, RESULT_NAME)
    args = ap.parse_args(argv)

    import torch

    from qaconv_ext.engine import load_trained
    from qaconv_ext.evaluation import extract_features
    from qaconv_ext.search import GalleryIndex, checkpoint_sha256

    shortlists = [int(s) for s in args.shortlists.split(",") if s]
    codebooks = [int(s) for s in args.codebooks.split(",") if s]
    sizes = [int(s) for s in args.scales.split(",") if s]
    b, distractors = synthetic_test_set(args.data_root)
    backbone, head, cfg = load_trained(args.checkpoint)
    load_before = os.getloadavg()
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    q_maps = extract_features(backbone, b.query, int(cfg["height"]), int(cfg["width"]), batch_size=args.batch_size,
                              progress=False, preprocess=cfg["preprocess"])
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    result: Dict[str, Any] = {
        "benchmark": "centroid_synthetic", "checkpoint": os.path.abspath(args.checkpoint),
        "checkpoint_sha256": checkpoint_sha256(args.checkpoint), "checkpoint_epochs": ck.get("epoch"),
        "model_config": {key: cfg.get(key) for key in ("arch", "height", "width", "neck", "epochs", "batch_size",
                                                       "lr", "step_size", "preprocess", "seed", "dataset")},
        "k": args.k, "timed_queries": args.timed_queries, "repeats": args.repeats, "galleries": {},
        "cpu_flags": _cpu_flags()}
    tmp = tempfile.mkdtemp(prefix="bench_centroid.")
    try:
        if args.scale_only:
            gen = torch.Generator().manual_seed(0)
            maps = torch.nn.functional.normalize(torch.randn(args.scale_only, *q_maps.shape[1:], generator=gen), dim=1)
            index = GalleryIndex.create(os.path.join(tmp, "random.idx"), head, maps)
            index.train_codebook(args.scale_codebook, iterations=2)  # its quality is not measured here
            print(f"scale: codes drawn at random, K={args.scale_codebook}, one query at a time; exhaustive rate on "
                  f"{args.scale_only} random maps measured before each size")
            result["scale"] = scale(index, q_maps, sizes, args.scale_codebook, args.scale_share, args.repeats)
            result["scale"]["exhaustive_index_maps"] = args.scale_only
        else:
            index = GalleryIndex.build(os.path.join(tmp, "test.idx"), args.checkpoint, b.gallery,
                                       batch_size=args.batch_size, progress=False)
            if not args.no_test_gallery:
                result["galleries"]["test"] = evaluate("domain_b test gallery", index, q_maps, b.query,
                                                       list(b.gallery), shortlists, codebooks, args.k, args.repeats,
                                                       args.timed_queries)
            big = result["galleries"].get("test")
            if not args.no_distractors:
                index.append_images(distractors, batch_size=args.batch_size, progress=False)
                big = evaluate("domain_b test gallery + every other image as distractors", index, q_maps, b.query,
                               list(b.gallery) + distractors, shortlists, codebooks, args.k, args.repeats,
                               args.timed_queries)
                result["galleries"]["enlarged"] = big
            if sizes:
                index.train_codebook(args.scale_codebook)
                print(f"scale: codes drawn at random, K={args.scale_codebook}, one query at a time")
                result["scale"] = scale(index, q_maps, sizes, args.scale_codebook, args.scale_share, args.repeats,
                                        big["exhaustive_seconds_per_map_per_query"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.update(machine_record(load_before, os.getloadavg()))
    result["uptime_before_after"] = [uptime_before,
                                     subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    save_result(args, RESULT_NAME, result)
    return result


if __name__ == "__main__":
    main()
