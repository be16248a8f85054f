"""``qaconv search``: find query images in a gallery index (``qaconv index build``) with its model.

    qaconv search --index archive.idx query1.jpg query2.jpg -k 10 -o ranked.png --json ranked.json
    qaconv search --index archive.idx query.jpg --shortlist 500      # two-stage: faster, approximate
    qaconv search --index archive.idx query.jpg --shortlist 500 --method centroid   # needs --codebook

Prints each query's ranked list (score, camera, time, identity when known, path); ``-o`` draws it
(one row per query), ``--json`` writes it. The model is the checkpoint recorded in the index unless
``--checkpoint`` gives its new location (it must be the same model).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List

from .common import (FAILED, CommandError, check_picture_ranks, error_line, image_record, json_path, picture_path, positive_int,
                     resolve_device, write_json)

__all__ = ["register", "run", "format_ranking"]

COMMAND = "qaconv search"

#: What ``qaconv search --help`` says (plain text).
DESCRIPTION = """\
Find query images in a gallery index (made by `qaconv index build`) with its model:

  qaconv search --index archive.idx query1.jpg query2.jpg -k 10 -o ranked.png --json ranked.json
  qaconv search --index archive.idx query.jpg --shortlist 500      # two-stage: faster, approximate
  qaconv search --index archive.idx query.jpg --shortlist 500 --method centroid   # needs --codebook

Prints each query's ranked list (score, camera, time, identity when known, path); -o draws it (one
row per query), --json writes it. The model is the checkpoint recorded in the index unless
--checkpoint gives its new location (it must be the same model).

Scores are always finite: a damaged index whose maps hold NaN or Inf ends the search with one line
naming the index (exit status 1); `qaconv index info --verify INDEX` tells which part is damaged."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``search`` sub-command."""
    p = subparsers.add_parser("search", help="find query images in a gallery index",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query images")
    p.add_argument("--index", required=True, help="gallery index folder (made by `qaconv index build`)")
    p.add_argument("-k", "--top", type=positive_int, default=10, dest="k", help="results per query (default: %(default)s)")
    p.add_argument("--shortlist", type=positive_int, default=None, metavar="M",
                   help="two-stage search: shortlist M candidates by a global descriptor, re-rank them exactly "
                        "(faster, approximate; default: exhaustive, exact)")
    p.add_argument("--method", choices=("exhaustive", "descriptor", "centroid"), default=None,
                   help="how to search: exhaustive (exact), or shortlist by the global descriptor or by the "
                        "index's centroid codes (`qaconv index build --codebook K`); default: exhaustive, "
                        "descriptor with --shortlist")
    p.add_argument("--checkpoint", default=None,
                   help="the index's model (default: the checkpoint recorded in the index; must be the same)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="query images per batch (default: %(default)s)")
    p.add_argument("-o", "--output", type=picture_path, default=None,
                   help="draw the ranked lists into this picture (.png or .jpg)")
    p.add_argument("--json", type=json_path, default=None, metavar="FILE.json", help="write the ranked lists as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _camera(camid: int) -> str:
    return f"c{camid + 1}" if camid is not None and camid >= 0 else "-"


def _time(t: Any) -> str:
    return f"{t:.1f}" if t is not None else "-"


def format_ranking(query: str, hits: List[Dict[str, Any]]) -> str:
    """The printed ranked list of one query."""
    lines = [f"query {query}", f"  {'rank':>4}  {'score':>9}  {'camera':>6}  {'time (s)':>10}  {'id':>6}  path"]
    for h in hits:
        pid = str(h["pid"]) if h["pid"] is not None and h["pid"] >= 0 else "-"
        lines.append(f"  {h['rank']:>4}  {h['score']:>9.4f}  {_camera(h['camid']):>6}  {_time(h['time']):>10}  "
                     f"{pid:>6}  {h['path'] or '(no path: map ' + str(h['index']) + ')'}")
    return "\n".join(lines)


def _draw(queries: List[str], results: List[List[Dict[str, Any]]], k: int, path: str) -> None:
    from ..data import Record
    from ..viz import draw_ranked_list, stack_pictures

    rows = []
    for q, hits in zip(queries, results):
        missing = [h["index"] for h in hits if not h["path"]]
        if missing:
            raise SystemExit(f"{COMMAND}: -o: the index holds no image path for map {missing[0]}; it cannot be drawn")
        gallery = [Record(h["path"], h["pid"], h["camid"], h["time"]) for h in hits]
        captions = [f"{_camera(h['camid'])}  t {_time(h['time'])}" for h in hits]
        # true/false frames only where the names tell both identities; grey otherwise
        qpid = image_record(q).pid
        known = qpid >= 0 and all(h["pid"] is not None and h["pid"] >= 0 for h in hits)
        matches = [h["pid"] == qpid for h in hits] if known else None
        rows.append([draw_ranked_list(q, gallery, [h["score"] for h in hits], matches, k=k,
                                      gallery_captions=captions, query_caption=os.path.basename(q),
                                      title=f"{os.path.basename(q)}: top {len(hits)} of the index")])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stack_pictures(rows).save(path)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv search``."""
    from ..data import ImageReadError, read_image
    from ..evaluation import extract_features
    from ..search import GalleryIndex, GalleryIndexError, NonFiniteScoresError

    if args.output:
        check_picture_ranks(args.k, COMMAND, " (or leave out -o: the printed and --json lists have no limit)")
    device = resolve_device(args.device, COMMAND)
    try:
        for img in args.images:
            read_image(img)  # a query the model cannot read ends the command before any work
        index = GalleryIndex.open(args.index)
        if args.k > len(index):
            raise GalleryIndexError(f"-k {args.k} is larger than the gallery: {index.path} holds {len(index)} maps")
        if args.shortlist is not None and args.shortlist < args.k:
            raise GalleryIndexError(f"--shortlist {args.shortlist} must be at least -k {args.k}")
        backbone, _, cfg = index.load_model(args.checkpoint, device)
        t0 = time.time()
        q = extract_features(backbone, list(args.images), int(cfg["height"]), int(cfg["width"]),
                             batch_size=args.batch_size, device=device, progress=False,
                             preprocess=cfg["preprocess"])
        t1 = time.time()
        scores, indices = index.search(q, k=args.k, shortlist=args.shortlist, method=args.method, device=device,
                                       progress=not args.no_progress and len(index) > 20000)
        t2 = time.time()
    except NonFiniteScoresError as exc:
        raise CommandError(f"{COMMAND}: {error_line(exc)}", FAILED) from None
    except (GalleryIndexError, ImageReadError) as exc:
        raise SystemExit(f"{COMMAND}: {error_line(exc)}") from None
    results = []
    for p in range(len(args.images)):
        hits = []
        for rank, (s, i) in enumerate(zip(scores[p].tolist(), indices[p].tolist()), start=1):
            r = index.records[i]
            hits.append({"rank": rank, "index": i, "score": s, "path": r.path, "pid": r.pid, "camid": r.camid,
                         "time": r.time})
        results.append(hits)
        print(format_ranking(args.images[p], hits))
    by = " by centroid codes" if args.method == "centroid" else ""
    mode = (f"two-stage{by}, shortlist {args.shortlist}" if args.shortlist and args.method != "exhaustive"
            else "exhaustive")
    print(f"{len(args.images)} quer{'y' if len(args.images) == 1 else 'ies'} against {len(index)} maps ({mode}): "
          f"features {t1 - t0:.2f} s, search {t2 - t1:.2f} s")
    if args.json:
        out = {"index": index.path, "maps": len(index), "k": args.k, "shortlist": args.shortlist, "method": args.method,
               "queries": [{"path": os.path.abspath(q), "results": hits} for q, hits in zip(args.images, results)]}
        print(f"wrote {write_json(args.json, out)}")
    if args.output:
        _draw(list(args.images), results, args.k, args.output)
        print(f"ranked lists -> {args.output}")
    return 0
