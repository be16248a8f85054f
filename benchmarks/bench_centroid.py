"""Centroid two-stage search against the descriptor two-stage and the exhaustive search, one run, one model.

Quality (real maps of a trained model), three galleries indexed with ``--checkpoint``: the synthetic
network's test gallery (``domain_b``); the same with every other rendered image as distractors (identity 0);
and an archive of ``--archive-maps`` maps (default 10^5): that gallery plus every image of further networks
rendered with seeds 1, 2, ... (about 37,600 images each, all distractors). The archive's index and its exact
ranking are kept in ``--cache`` between runs (the extraction and the exhaustive ranking take tens of
minutes). Per gallery, the 144 queries are searched

* exhaustively (the exact QAConv ranking, the reference),
* by the descriptor two-stage (average-pooled map, cosine; the best M re-ranked exactly), and
* by the centroid two-stage for each codebook size K (each map stored as ``h * w`` uint16 centroid ids;
  the best M by the centroid score, re-ranked exactly), with the uint8 query table (the default) and, on
  the archive, the float32 one.

Reported per method: recall of the exact top 10 (share of the exhaustive top 10 in the method's top 10),
Rank-1 and mAP (Market-1501 protocol; a two-stage ranking is its re-ranked shortlist, then the rest of the
gallery by the first-stage score), ms per query (queries one at a time; median of ``--repeats``; the
archive's exhaustive search once), bytes per map of what the first stage reads, and for each K the
codebook's training and encoding time.

Scale (``--scales``, default 10^5 and 10^6 maps): codes drawn at random (uniform ids; the kernels' cost does
not depend on their values) are scored by the candidate stage for one query at a time with both tables
(measured: ms per query, peak resident memory, bytes of codes in RAM); the exact stage re-ranks each share
of ``--scale-shares`` of the maps, read from the largest real gallery's index file (indices taken modulo
its size: measured, with the reads); the exhaustive search is that gallery's measured per-map exhaustive
rate times the size (extrapolated, linear: it streams the gallery). The speed-up at each size is
extrapolated exhaustive / (measured candidate stage + measured exact stage).

    python benchmarks/bench_centroid.py --update-results            # the demo's model, runs/demo/qaconv.pt
    python benchmarks/bench_centroid.py --scale-only 2048 --json scale.json   # the scale timing alone
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import add_output_args, cpu_flags, machine_record, reset_peak_rss, save_result, status_kib  # noqa: E402
from bench_two_stage import _ranking_distance, _timed, _two_stage_order, search_bench_parser, synthetic_test_set  # noqa: E402  (same rules)

RESULT_NAME = "centroid_synthetic.json"


#: Per extra network (each seed, both domains, every image): about 37,600 images.
ARCHIVE_NETWORK = {"num_train_ids": 1000, "num_test_ids": 499, "num_distractors": 1000}


def archive_gallery(data_root: str, test_gallery: List[Any], distractors: List[Any], maps: int) -> List[Any]:
    """``maps`` gallery records: the test gallery, every other image of the synthetic network, then every image
    of further networks rendered with seeds 1, 2, ... (:data:`ARCHIVE_NETWORK`, under ``<data_root>-archive``),
    all of them distractors (identity 0), cut at ``maps``."""
    from qaconv_ext.data import Market1501, Record, make_synthetic_network

    out = list(test_gallery) + list(distractors)
    seed = 0
    while len(out) < maps:
        seed += 1
        paths = make_synthetic_network(os.path.join(f"{os.path.abspath(data_root)}-archive", f"seed-{seed}"),
                                       seed=seed, progress=True, **ARCHIVE_NETWORK)
        for dom in ("domain_a", "domain_b"):
            ds = Market1501(paths[dom])
            out += [Record(r.path, 0, r.camid, r.time) for r in list(ds.train) + list(ds.query) + list(ds.gallery)]
    return out[:maps]


def cached_index(cache: str, checkpoint: str, records: List[Any], batch_size: int) -> Any:
    """The index of ``records`` made with ``checkpoint``, kept in ``cache`` between runs (the extraction of
    10^5 images takes minutes): re-used when its records are these, rebuilt otherwise."""
    import hashlib

    from qaconv_ext.search import GalleryIndex, GalleryIndexError, checkpoint_sha256

    key = hashlib.sha256("\n".join(r.path for r in records).encode()).hexdigest()[:12]
    path = os.path.join(cache, f"archive-{checkpoint_sha256(checkpoint)[:12]}-{len(records)}-{key}.idx")
    try:
        index = GalleryIndex.open(path, checkpoint=checkpoint)
        if [r.path for r in index.records] == [r.path for r in records]:
            print(f"re-using {path}")
            return index
    except (GalleryIndexError, OSError):
        pass
    os.makedirs(cache, exist_ok=True)
    print(f"indexing {len(records)} images into {path}")
    return GalleryIndex.build(path, checkpoint, records, batch_size=batch_size, progress=True, overwrite=True)


def exact_ranking(index: Any, q_maps: Any, cache: Optional[str]) -> Any:
    """The exhaustive (exact) ranking of the whole gallery for every query ``[P, N]`` (int64), kept next to
    a cached index (``<index>.exact-<queries' digest>.npy``) as it takes minutes at 10^5 maps."""
    import hashlib

    import numpy as np
    import torch

    N = len(index)
    path = None
    if cache is not None:
        digest = hashlib.sha256(q_maps.numpy().tobytes()).hexdigest()[:12]
        path = f"{index.path}.exact-{digest}.npy"
        if os.path.exists(path):
            order = np.load(path)
            if order.shape == (q_maps.shape[0], N):
                return torch.from_numpy(order.astype(np.int64))
    _, full_i = index.search(q_maps, k=N)
    if path is not None:
        np.save(path, full_i.numpy().astype(np.int32))
    return full_i


def _recall(order, exact_top, k: int) -> float:
    import numpy as np

    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(order[:, :k], exact_top)]))


def _row(name: str, r: Dict[str, Any]) -> str:
    ms = f"{1e3 * r['seconds_per_query']:>10.1f}" if "seconds_per_query" in r else f"{'-':>10}"
    sp = f"{r['speedup']:>8.1f}x" if "speedup" in r else f"{'-':>9}"
    return (f"  {name:<26}{100 * r['recall_top10']:>9.1f}%{100 * r['rank1']:>8.1f}{100 * r['mAP']:>8.1f}{ms}{sp}"
            f"{r.get('first_stage_bytes_per_map', 0):>8}")


def evaluate(name: str, index: Any, q_maps: Any, query: List[Any], gallery: List[Any], shortlists: List[int],
             codebooks: List[int], k: int, repeats: int, timed: int, cache: Optional[str] = None,
             exhaustive_repeats: Optional[int] = None, tables: Sequence[str] = ("uint8",)) -> Dict[str, Any]:
    import numpy as np
    import torch

    from qaconv_ext.evaluation import rank_metrics
    from qaconv_ext.ops import centroid_score, centroid_table, quantize_centroid_table
    from qaconv_ext.search import centroid_topk, global_descriptors, rerank_shortlist

    N, P = len(index), q_maps.shape[0]
    d, h, w = index.map_shape
    timed = min(timed, P)
    t0 = time.perf_counter()
    full_i = exact_ranking(index, q_maps, cache)  # the exact ranking of the whole gallery
    exact_all_s = time.perf_counter() - t0
    exact_top = full_i[:, :k]
    out: Dict[str, Any] = {"gallery": N, "queries": P, "map_shape": [d, h, w],
                           "map_bytes_float16": 2 * d * h * w, "methods": {}}

    def one_by_one(search: Any) -> None:  # the first `timed` queries, one search each
        for p in range(timed):
            search(q_maps[p:p + 1])

    t_ex = _timed(lambda: one_by_one(lambda q: index.search(q, k=k)), exhaustive_repeats or repeats) / timed
    m = rank_metrics(_ranking_distance(full_i, N), query, gallery)
    out["methods"]["exhaustive"] = {"recall_top10": 1.0, "rank1": m["rank1"], "mAP": m["mAP"],
                                    "seconds_per_query": t_ex, "speedup": 1.0,
                                    "first_stage_bytes_per_map": 2 * d * h * w}
    if cache is None:
        out["exhaustive_all_queries_s"] = exact_all_s
    out["exhaustive_seconds_per_map_per_query"] = t_ex / N

    def shortlist_search(method: str, table: str) -> Any:
        """search(q, k, M): index.search, or for a float32 centroid table the same two stages by hand."""
        if method != "centroid" or table == "uint8":
            return lambda q, kk, M: index.search(q, k=kk, shortlist=M, method=method)
        w, b = index.folded_head()

        def search(q: Any, kk: int, M: int) -> Any:
            _, cand = centroid_topk(q, index.iter_codes(), index.centroids(), w, b, M, table=table)
            return rerank_shortlist(q, cand, index.read_maps, w, b, kk)
        return search

    def two_stage(label: str, first_sim: Any, method: str, bytes_per_map: int, extra: Dict[str, Any],
                  table: str = "uint8") -> None:
        by_first = torch.sort(first_sim, dim=1, descending=True, stable=True).indices
        mf = rank_metrics(_ranking_distance(by_first, N), query, gallery)
        out["methods"][f"{label} only"] = {"recall_top10": _recall(by_first, exact_top, k), "rank1": mf["rank1"],
                                           "mAP": mf["mAP"], **extra}
        search = shortlist_search(method, table)
        for M in shortlists:
            if M >= N:
                continue
            _, short_i = search(q_maps, M, M)
            order = _two_stage_order(short_i, first_sim)
            ms = rank_metrics(_ranking_distance(order, N), query, gallery)
            t = _timed(lambda: one_by_one(lambda q: search(q, k, M)), repeats) / timed
            out["methods"][f"{label} M={M}"] = {
                "recall_top10": _recall(order, exact_top, k), "rank1": ms["rank1"], "mAP": ms["mAP"],
                "shortlist_share": M / N, "seconds_per_query": t, "speedup": t_ex / t,
                "first_stage_bytes_per_map": bytes_per_map, "table": table if method == "centroid" else None}

    desc = torch.from_numpy(np.array(index.descriptors()))
    two_stage("descriptor", global_descriptors(q_maps) @ desc.t(), "descriptor", 4 * d, {})
    w_head, b_head = index.folded_head()
    for K in codebooks:
        t0 = time.perf_counter()
        index.train_codebook(K)
        train_s = time.perf_counter() - t0
        codes = torch.from_numpy(np.concatenate(list(index.iter_codes())).view(np.uint16))
        t32 = centroid_table(index.centroids(), q_maps)
        cb = index.manifest["codebook"]
        for table in tables:
            lookup = quantize_centroid_table(t32) if table == "uint8" else t32
            sim = centroid_score(lookup, codes, w_head, b_head)
            two_stage(f"centroid K={K}" + (" float32" if table == "float32" else ""), sim, "centroid", 2 * h * w,
                      {"codebook_train_and_encode_s": train_s, "train_error": cb["train_error"], "sample": cb["sample"],
                       "codebook_bytes": 4 * K * d, "table": table, "table_bytes_per_query": K * h * w *
                       (1 if table == "uint8" else 4)}, table)
    print(f"{name}: {P} queries, {N} gallery maps")
    print(f"  {'method':<26}{'recall@10':>10}{'Rank-1':>8}{'mAP':>8}{'ms/query':>10}{'speed-up':>9}{'B/map':>8}")
    for meth, r in out["methods"].items():
        print(_row(meth, r))
    return out


def scale(index: Any, q_maps: Any, sizes: List[int], K: int, shares: List[float], repeats: int,
          per_map_exhaustive: Optional[float] = None) -> Dict[str, Any]:
    """Candidate-stage latency on random codes of ``sizes`` maps (uint8 and float32 query tables), the
    measured exact stage of each of ``shares`` of them, and the extrapolated exhaustive search:
    ``per_map_exhaustive`` seconds per map, or (``None``) the index's exhaustive search measured right before
    each size, so each ratio comes from one stretch of time."""
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
    out: Dict[str, Any] = {"K": K, "shortlist_shares": shares, "runs": []}
    real = len(index)

    def fetch(ids: Any) -> Any:  # the M candidates' maps: real maps of the index, read from its file
        return index.read_maps(np.asarray(ids) % real)

    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        codes = torch.randint(0, K, (n, L), generator=gen, dtype=torch.int32).to(torch.uint16).numpy()
        chunks = [codes[s:s + (1 << 16)] for s in range(0, n, 1 << 16)]
        rate = per_map_exhaustive
        if rate is None:
            rate = _timed(lambda: index.search(q, k=10), repeats) / real
        t_ex = rate * n
        for share in shares:
            M = max(10, int(round(share * n)))
            rss_before = status_kib("VmRSS")
            exact_peak = reset_peak_rss()
            t_cand = _timed(lambda: centroid_topk(q, chunks, centroids, weight, bias, M), repeats)
            peak = status_kib("VmHWM")
            t_cand32 = _timed(lambda: centroid_topk(q, chunks, centroids, weight, bias, M, table="float32"),
                              repeats)
            _, cand = centroid_topk(q, chunks, centroids, weight, bias, M)
            t_exact = _timed(lambda: rerank_shortlist(q, cand, fetch, weight, bias, 10), repeats)
            r = {"maps": n, "shortlist": M, "shortlist_share": share, "exhaustive_s_per_map": rate,
                 "candidate_stage_s": t_cand, "candidate_stage_float32_table_s": t_cand32, "exact_stage_s": t_exact,
                 "exact_stage_maps_read": int(cand.shape[1]), "two_stage_s": t_cand + t_exact,
                 "exhaustive_s_extrapolated": t_ex, "speedup_extrapolated": t_ex / (t_cand + t_exact),
                 "speedup_extrapolated_float32_table": t_ex / (t_cand32 + t_exact),
                 "codes_bytes_in_ram": int(codes.nbytes), "codes_bytes_per_map": 2 * L,
                 "rss_before_kib": rss_before, "candidate_stage_peak_rss_kib": peak,
                 "candidate_stage_peak_above_codes_kib": peak - rss_before, "peak_rss_exact": exact_peak}
            out["runs"].append(r)
            print(f"  {n:>9} maps, M={M}: candidates {1e3 * t_cand:7.1f} ms (float32 table {1e3 * t_cand32:7.1f} ms), "
                  f"exact stage {1e3 * t_exact:7.1f} ms, exhaustive (extrapolated) {t_ex:7.1f} s -> "
                  f"{r['speedup_extrapolated']:.1f}x ({r['speedup_extrapolated_float32_table']:.1f}x); codes "
                  f"{codes.nbytes / 2 ** 20:.0f} MiB, peak RSS +{(peak - rss_before) / 1024:.0f} MiB")
        del codes, chunks
    return out


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    ap = search_bench_parser(__doc__, "10,25,50,100,250,500", 12)
    ap.add_argument("--codebooks", default="256,1024,4096")
    ap.add_argument("--scales", default="100000,1000000")
    ap.add_argument("--scale-codebook", type=int, default=4096, help="K of the scale timing (default: %(default)s)")
    ap.add_argument("--scale-shares", default="0.01,0.0025", help="M / N at scale (default: %(default)s)")
    ap.add_argument("--no-test-gallery", action="store_true", help="only the gallery with distractors")
    ap.add_argument("--no-distractors", action="store_true", help="only the test gallery (and scale on it)")
    ap.add_argument("--archive-maps", type=int, default=100000, metavar="N",
                    help="an archive gallery of N real maps: the enlarged gallery and images of further rendered "
                         "networks (0: none; default: %(default)s)")
    ap.add_argument("--archive-shortlists", default="100,250,500,1000",
                    help="M on the archive gallery (default: %(default)s)")
    ap.add_argument("--archive-codebooks", default="1024,4096", help="K on the archive gallery (default: %(default)s)")
    ap.add_argument("--tables", default="uint8,float32",
                    help="centroid query tables compared on the archive gallery (default: %(default)s)")
    ap.add_argument("--cache", default=os.path.join("runs", "bench_cache"),
                    help="keeps the archive's index and exact ranking between runs (default: %(default)s)")
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
    shares = [float(s) for s in args.scale_shares.split(",") if s]
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
        "cpu_flags": cpu_flags()}
    tmp = tempfile.mkdtemp(prefix="bench_centroid.")
    try:
        if args.scale_only:
            gen = torch.Generator().manual_seed(0)
            maps = torch.nn.functional.normalize(torch.randn(args.scale_only, *q_maps.shape[1:], generator=gen), dim=1)
            index = GalleryIndex.create(os.path.join(tmp, "random.idx"), head, maps)
            index.train_codebook(args.scale_codebook, iterations=2)  # its quality is not measured here
            print(f"scale: codes drawn at random, K={args.scale_codebook}, one query at a time; exhaustive rate on "
                  f"{args.scale_only} random maps measured before each size")
            result["scale"] = scale(index, q_maps, sizes, args.scale_codebook, shares, args.repeats)
            result["scale"]["exhaustive_index_maps"] = args.scale_only
        else:
            index = GalleryIndex.build(os.path.join(tmp, "test.idx"), args.checkpoint, b.gallery,
                                       batch_size=args.batch_size, progress=False)
            if not args.no_test_gallery:
                result["galleries"]["test"] = evaluate("domain_b test gallery", index, q_maps, b.query,
                                                       list(b.gallery), shortlists, codebooks, args.k, args.repeats,
                                                       args.timed_queries)
            big, scale_index = result["galleries"].get("test"), index
            if not args.no_distractors:
                index.append_images(distractors, batch_size=args.batch_size, progress=False)
                big = evaluate("domain_b test gallery + every other image as distractors", index, q_maps, b.query,
                               list(b.gallery) + distractors, shortlists, codebooks, args.k, args.repeats,
                               args.timed_queries)
                result["galleries"]["enlarged"] = big
            if not args.no_distractors and args.archive_maps:
                records = archive_gallery(args.data_root, list(b.gallery), distractors, args.archive_maps)
                scale_index = cached_index(args.cache, args.checkpoint, records, args.batch_size)
                big = evaluate(f"archive: the test gallery + {len(records) - len(b.gallery)} distractors", scale_index,
                               q_maps, b.query, records, [int(s) for s in args.archive_shortlists.split(",")],
                               [int(s) for s in args.archive_codebooks.split(",")], args.k, args.repeats,
                               args.timed_queries, cache=args.cache, exhaustive_repeats=1,
                               tables=[t for t in args.tables.split(",") if t])
                result["galleries"]["archive"] = big
                result["archive_network"] = ARCHIVE_NETWORK
            if sizes:
                if not (scale_index.has_codebook and scale_index.centroids().shape[0] == args.scale_codebook):
                    scale_index.train_codebook(args.scale_codebook)
                print(f"scale: codes drawn at random, K={args.scale_codebook}, one query at a time; the exhaustive "
                      f"rate of the {len(scale_index)}-map gallery")
                result["scale"] = scale(scale_index, q_maps, sizes, args.scale_codebook, shares,
                                        args.repeats, big["exhaustive_seconds_per_map_per_query"])
                result["scale"]["exhaustive_index_maps"] = len(scale_index)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.update(machine_record(load_before, os.getloadavg()))
    result["uptime_before_after"] = [uptime_before,
                                     subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    save_result(args, RESULT_NAME, result)
    return result


if __name__ == "__main__":
    main()
