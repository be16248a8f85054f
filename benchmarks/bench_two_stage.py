"""Two-stage search against exhaustive search on the synthetic camera network, with a trained model.

The gallery of ``domain_b`` (the demo's test set) is indexed with a trained QAConv checkpoint (default: the
demo's, ``runs/demo/qaconv.pt``), and so is an enlarged gallery: the same images plus every other image of
both domains (``domain_b``'s training images and all of ``domain_a``) as distractors (identity 0, so they
never match a query). For each gallery and each shortlist size M, the 144 queries are searched

* exhaustively (every gallery map scored by the fused op: the exact QAConv ranking), and
* in two stages: the M best by the global descriptor (average-pooled, L2-normalised map; cosine), re-ranked
  by the exact QAConv score.

Reported: recall of the exact top 10 (the share of the exhaustive top-10 found in the two-stage top-10),
Rank-1 and mAP (Market-1501 protocol; the two-stage ranking is its re-ranked shortlist followed by the
rest of the gallery in descriptor order), and the search time per query with its speed-up (top 10), both
for queries searched one at a time (``--timed-queries`` of them: the latency of ``qaconv search`` with one
image) and for all queries in one call (the exhaustive search then scores them as one batch). The descriptor alone is listed
for reference, and the float32 features (not stored in float16) for the exhaustive metrics.

    python benchmarks/bench_two_stage.py --checkpoint runs/demo/qaconv.pt --data-root data_cache/synthetic
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional

from _machine import add_output_args, machine_record, save_result  # benchmarks/_machine.py

RESULT_NAME = "two_stage_synthetic.json"


def _ranking_distance(order, n: int):
    """A distance matrix whose ascending order per row is ``order`` (``[P, n]`` gallery indices)."""
    import torch

    dist = torch.empty(order.shape[0], n)
    dist.scatter_(1, order, torch.arange(n, dtype=torch.float32).expand(order.shape[0], n).contiguous())
    return dist


def _two_stage_order(shortlist_order, desc_sim):
    """Full rankings: each query's re-ranked shortlist, then the other gallery entries by descriptor similarity."""
    import torch

    P, n = desc_sim.shape
    by_desc = torch.sort(desc_sim, dim=1, descending=True, stable=True).indices
    out = torch.empty(P, n, dtype=torch.int64)
    for p in range(P):
        short = shortlist_order[p]
        rest = by_desc[p][~torch.isin(by_desc[p], short)]
        out[p] = torch.cat([short, rest])
    return out


def synthetic_test_set(data_root: str):
    """The synthetic network's test set (``domain_b``, generated in ``data_root`` when missing) and every other
    image it renders (``domain_b``'s training images and all of ``domain_a``) as distractors of identity 0."""
    from qaconv_ext.data import Market1501, Record, make_synthetic_network

    paths = make_synthetic_network(data_root, progress=False)
    b, a = Market1501(paths["domain_b"]), Market1501(paths["domain_a"])
    distractors = [Record(r.path, 0, r.camid, r.time) for r in list(b.train) + list(a.train) + list(a.query)
                   + list(a.gallery)]
    return b, distractors


def _timed(fn, repeats: int) -> float:
    import statistics

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def evaluate_gallery(name: str, index: Any, q_maps: Any, query: List[Any], gallery: List[Any], shortlists: List[int],
                     k: int, repeats: int, timed_queries: int, g_fea32: Optional[Any] = None, head: Any = None
                     ) -> Dict[str, Any]:
    import numpy as np
    import torch

    from qaconv_ext.evaluation import rank_metrics, score_blocks
    from qaconv_ext.search import global_descriptors

    N, P = len(index), q_maps.shape[0]
    full_v, full_i = index.search(q_maps, k=N)  # the exact ranking of the whole gallery
    exact_top = full_i[:, :k]
    out: Dict[str, Any] = {"gallery": N, "queries": P, "methods": {}}
    timed = min(P, timed_queries)

    def one_by_one(**kw: Any) -> None:
        for p in range(timed):
            index.search(q_maps[p:p + 1], k=k, **kw)

    t_ex = _timed(one_by_one, repeats) / timed
    t_ex_batch = _timed(lambda: index.search(q_maps, k=k), repeats) / P
    m = rank_metrics(_ranking_distance(full_i, N), query, gallery)
    out["methods"]["exhaustive"] = {"recall_top10": 1.0, "rank1": m["rank1"], "mAP": m["mAP"],
                                    "seconds_per_query": t_ex, "speedup": 1.0,
                                    "seconds_per_query_batched": t_ex_batch, "speedup_batched": 1.0}
    if g_fea32 is not None:
        s32 = score_blocks(head, q_maps.float(), g_fea32, progress=False)
        m32 = rank_metrics(-s32, query, gallery)
        out["float32_features_exhaustive"] = {"rank1": m32["rank1"], "mAP": m32["mAP"]}
    desc = torch.from_numpy(np.array(index.descriptors()))
    desc_sim = global_descriptors(q_maps) @ desc.t()
    by_desc = torch.sort(desc_sim, dim=1, descending=True, stable=True).indices
    md = rank_metrics(_ranking_distance(by_desc, N), query, gallery)
    out["methods"]["descriptor only"] = {
        "recall_top10": float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k
                                       for a, b in zip(by_desc[:, :k], exact_top)])),
        "rank1": md["rank1"], "mAP": md["mAP"]}
    for M in shortlists:
        if M >= N:
            continue
        _, short_i = index.search(q_maps, k=M, shortlist=M)
        order = _two_stage_order(short_i, desc_sim)
        recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(order[:, :k], exact_top)]))
        ms = rank_metrics(_ranking_distance(order, N), query, gallery)
        t = _timed(lambda: one_by_one(shortlist=M), repeats) / timed
        tb = _timed(lambda: index.search(q_maps, k=k, shortlist=M), repeats) / P
        out["methods"][f"two-stage M={M}"] = {"recall_top10": recall, "rank1": ms["rank1"], "mAP": ms["mAP"],
                                               "seconds_per_query": t, "speedup": t_ex / t,
                                               "seconds_per_query_batched": tb, "speedup_batched": t_ex_batch / tb}
    print(f"{name}: {P} queries, {N} gallery maps")
    print(f"  {'method':<20}{'recall@10':>10}{'Rank-1':>8}{'mAP':>8}{'ms/query':>10}{'speed-up':>10}"
          f"{'batched':>10}{'speed-up':>10}")
    for meth, r in out["methods"].items():
        cols = ""
        for key, sp in (("seconds_per_query", "speedup"), ("seconds_per_query_batched", "speedup_batched")):
            cols += (f"{1e3 * r[key]:>10.1f}{r[sp]:>9.1f}x" if key in r else f"{'-':>10}{'-':>10}")
        print(f"  {meth:<20}{100 * r['recall_top10']:>9.1f}%{100 * r['rank1']:>8.1f}{100 * r['mAP']:>8.1f}{cols}")
    return out


def search_bench_parser(description: str, shortlists: str, timed_queries: int) -> argparse.ArgumentParser:
    """The options the search benchmarks share: the model (the demo's by default), the synthetic network,
    the shortlists, k, repeats, the timed queries and the extraction batch."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join("runs", "demo", "qaconv.pt"))
    ap.add_argument("--data-root", default=os.path.join("data_cache", "synthetic"),
                    help="the synthetic network's folder (generated there when missing)")
    ap.add_argument("--shortlists", default=shortlists)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timed-queries", type=int, default=timed_queries,
                    help="queries searched one at a time for the latency (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64)
    return ap


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, Any]]:
    ap = search_bench_parser(__doc__, "50,100,500,1000", 24)
    ap.add_argument("--no-enlarged", action="store_true", help="only the test gallery")
    add_output_args(ap, RESULT_NAME)
    args = ap.parse_args(argv)

    import torch

    from qaconv_ext.engine import load_trained
    from qaconv_ext.evaluation import extract_features
    from qaconv_ext.search import GalleryIndex, checkpoint_sha256

    shortlists = [int(s) for s in args.shortlists.split(",") if s]
    b, distractors = synthetic_test_set(args.data_root)
    backbone, head, cfg = load_trained(args.checkpoint)
    h, w = int(cfg["height"]), int(cfg["width"])
    load_before = os.getloadavg()
    q_maps = extract_features(backbone, b.query, h, w, batch_size=args.batch_size, progress=False,
                              preprocess=cfg["preprocess"])
    result: Dict[str, Any] = {"benchmark": "two_stage_synthetic", "checkpoint": os.path.abspath(args.checkpoint),
                              "checkpoint_sha256": checkpoint_sha256(args.checkpoint),
                              "checkpoint_epochs": torch.load(args.checkpoint, map_location="cpu",
                                                              weights_only=True).get("epoch"),
                              "k": args.k, "galleries": {}}
    tmp = tempfile.mkdtemp(prefix="bench_two_stage.")
    try:
        t = time.perf_counter()
        index = GalleryIndex.build(os.path.join(tmp, "test.idx"), args.checkpoint, b.gallery,
                                   batch_size=args.batch_size, progress=False)
        result["index_build_s"] = time.perf_counter() - t
        g32 = extract_features(backbone, b.gallery, h, w, batch_size=args.batch_size, progress=False,
                               preprocess=cfg["preprocess"])
        result["galleries"]["test"] = evaluate_gallery("domain_b test gallery", index, q_maps, b.query,
                                                       list(b.gallery), shortlists, args.k, args.repeats,
                                                       args.timed_queries, g32, head)
        if not args.no_enlarged:
            index.append_images(distractors, batch_size=args.batch_size, progress=False)
            result["galleries"]["enlarged"] = evaluate_gallery(
                "domain_b test gallery + every other image as distractors", index, q_maps, b.query,
                list(b.gallery) + distractors, shortlists, args.k, args.repeats, args.timed_queries)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.update(machine_record(load_before, os.getloadavg()))
    save_result(args, RESULT_NAME, result)
    return result


if __name__ == "__main__":
    main()
