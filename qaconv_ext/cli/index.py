"""``qaconv index``: build a gallery index from images with a trained model, append to it, describe it.

    qaconv index build --checkpoint runs/demo/qaconv.pt --images FOLDER -o archive.idx
    qaconv index build --checkpoint runs/demo/qaconv.pt --dataset synthetic-b -o archive.idx
    qaconv index build --checkpoint runs/demo/qaconv.pt --images FOLDER -o archive.idx --codebook 4096
    qaconv index append archive.idx --images NEW_FOLDER
    qaconv index codebook archive.idx --k 4096        # train (or retrain) the centroid codebook
    qaconv index info archive.idx [--verify]
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, List

from .common import (
    DATASET_CHOICES,
    error_line,
    image_record,
    load_dataset,
    non_negative_int,
    positive_int,
    resolve_device,
)

__all__ = ["register", "run", "image_records"]

COMMAND = "qaconv index"

#: What ``qaconv index --help`` says (plain text).
DESCRIPTION = """\
Build a gallery index from images with a trained model, append to it, describe it:

  qaconv index build --checkpoint runs/demo/qaconv.pt --images FOLDER -o archive.idx
  qaconv index build --checkpoint runs/demo/qaconv.pt --dataset synthetic-b -o archive.idx
  qaconv index build --checkpoint runs/demo/qaconv.pt --images FOLDER -o archive.idx --codebook 4096
  qaconv index append archive.idx --images NEW_FOLDER
  qaconv index codebook archive.idx --k 4096        # train (or retrain) the centroid codebook
  qaconv index info archive.idx [--verify]

--codebook K stores every map as K-centroid codes for `qaconv search --method centroid` (0: K by the
gallery's size); appends encode new maps with it and say when a retrain is worthwhile.

`qaconv index ACTION --help` describes an action."""

def image_records(paths: List[str]) -> List[Any]:
    """Records of the image files in ``paths`` (files, or folders searched recursively, sorted): absolute
    path; identity and camera from names like ``0002_c3s1_000451_01.jpg``, else unknown (-1); no time."""
    from ..data.datasets import IMAGE_EXTENSIONS

    files: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise SystemExit(f"{COMMAND}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {p}")
            files += sorted(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise SystemExit(f"{COMMAND}: --images: no such file or folder: {p}")
    return [image_record(f) for f in files]


def _source_records(args: argparse.Namespace) -> List[Any]:
    if bool(args.images) == bool(args.dataset):
        raise SystemExit(f"{COMMAND} {args.action}: give either --images or --dataset")
    if args.images:
        return image_records(args.images)
    ds = load_dataset(args.dataset, args.data_root, verbose=False)
    split = {"gallery": ds.gallery, "query": ds.query, "train": ds.train,
             "all": list(ds.train) + list(ds.query) + list(ds.gallery)}[args.split]
    if not split:
        raise SystemExit(f"{COMMAND} {args.action}: {args.dataset} has no {args.split} images")
    return list(split)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--dataset", choices=DATASET_CHOICES, help="index a dataset's images instead")
    p.add_argument("--data-root", default=None, help="the dataset's folder (as for `qaconv eval`)")
    p.add_argument("--split", choices=("gallery", "query", "train", "all"), default="gallery",
                   help="which images of --dataset (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="data-loading processes, 0 to load in this process (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``index`` sub-command (``build``, ``append``, ``info``)."""
    p = subparsers.add_parser("index", help="build, append to or describe a gallery index on disk",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION", help="what to do with the index")
    b = sub.add_parser("build", help="index images with a trained QAConv model")
    b.add_argument("--checkpoint", required=True, help="trained QAConv model (file, or folder with checkpoint.pt)")
    _add_source_args(b)
    b.add_argument("-o", "--output", required=True, metavar="INDEX", help="the index folder to create")
    b.add_argument("--overwrite", action="store_true", help="replace an existing index at INDEX")
    b.add_argument("--codebook", type=non_negative_int, default=None, metavar="K",
                   help="also train a codebook of K centroids (at most 65536; 0: by the gallery's size) and store "
                        "every map's centroid codes, for `qaconv search --method centroid`")
    a = sub.add_parser("append", help="add images to an index (with the model that made it)")
    a.add_argument("index", metavar="INDEX", help="the index folder to add to")
    a.add_argument("--checkpoint", default=None,
                   help="the index's model (default: the checkpoint recorded in the index; must be the same)")
    _add_source_args(a)
    c = sub.add_parser("codebook", help="train (or retrain) the centroid codebook of an index and code its maps")
    c.add_argument("index", metavar="INDEX", help="the index folder")
    c.add_argument("--k", type=non_negative_int, default=0,
                   help="centroids, at most 65536 (default: 0, by the gallery's size)")
    c.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")
    c.add_argument("--iterations", type=positive_int, default=10, help="k-means iterations (default: %(default)s)")
    i = sub.add_parser("info", help="describe an index (and check its data)")
    i.add_argument("index", metavar="INDEX", help="the index folder to describe")
    i.add_argument("--verify", action="store_true", help="check every checksum (reads all maps)")
    p.set_defaults(func=run, action=None, _parser=p)
    return p


def _size(index: Any) -> str:
    """The committed size of ``index`` (what its manifest commits; leftover bytes are not counted)."""
    return f"{index.disk_usage()[0] / 2 ** 20:.1f} MiB"


def _codebook_line(index: Any) -> str:
    """One line on the index's codebook and its drift (empty without one)."""
    cb = index.manifest.get("codebook")
    if cb is None:
        return ""
    drift = index.codebook_drift()
    line = (f"  codebook: {cb['k']} centroids (k-means on {cb['sample']} location vectors of {cb['trained_on']} "
            f"maps, error {drift['train_error']:.4f}), codes {2 * index.map_shape[1] * index.map_shape[2]} "
            "bytes per map")
    if drift["appended_maps"]:
        line += (f"; {drift['appended_maps']} maps appended since, error {drift['appended_error']:.4f} "
                 f"({drift['ratio']:.2f}x)" + (": retrain worthwhile (qaconv index codebook)" if drift["retrain"]
                                              else ""))
    return line


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv index``."""
    from ..data import ImageReadError
    from ..search import GalleryIndex, GalleryIndexError

    if args.action is None:
        args._parser.print_help()
        return 2
    try:
        if args.action == "info":
            index = GalleryIndex.open(args.index, verify=args.verify)
            print(index)
            print(f"  {len(index)} maps of {' x '.join(map(str, index.map_shape))} (float16), {_size(index)} committed, "
                  f"{len(index.manifest['segments'])} segment(s), last change {index.manifest['updated']}")
            leftover = index.disk_usage()[1]
            if leftover:
                print(f"  plus {leftover / 2 ** 20:.1f} MiB ({leftover} bytes) behind the committed end, left by an "
                      "interrupted append: ignored, and removed by the next append")
            pre = index.model.get("preprocessing")
            if pre:
                preset = index.model.get("preprocess")
                named = f", preset {preset}" if preset else ""
                print(f"  input {index.model['input_size'][0]} x {index.model['input_size'][1]}{named}: {pre}")
            if index.has_codebook:
                print(_codebook_line(index))
            if args.verify:
                index.verify()
                print("  checksums: all match")
            return 0
        if args.action == "codebook":
            t0 = time.time()
            index = GalleryIndex.open(args.index).train_codebook(args.k or None, seed=args.seed,
                                                                 iterations=args.iterations)
            print(f"trained in {time.time() - t0:.1f} s: {index.path}")
            print(_codebook_line(index))
            return 0
        device = resolve_device(args.device, COMMAND)
        records = _source_records(args)
        t0 = time.time()
        if args.action == "build":
            index = GalleryIndex.build(args.output, args.checkpoint, records, batch_size=args.batch_size,
                                       device=device, workers=args.workers, progress=not args.no_progress,
                                       overwrite=args.overwrite, codebook=args.codebook)
            print(f"indexed {len(index)} images in {time.time() - t0:.1f} s -> {index.path} "
                  f"({' x '.join(map(str, index.map_shape))} maps, {_size(index)})")
        else:
            index = GalleryIndex.open(args.index)
            index.append_images(records, checkpoint=args.checkpoint, batch_size=args.batch_size, device=device,
                                workers=args.workers, progress=not args.no_progress)
            # one commit adds all the records or none; `len(index)` also counts appends of other processes
            print(f"appended {len(records)} images in {time.time() - t0:.1f} s: {index.path} now holds "
                  f"{len(index)} maps ({_size(index)})")
        if index.has_codebook:
            print(_codebook_line(index))
    except (GalleryIndexError, ImageReadError) as exc:
        raise SystemExit(f"{COMMAND}: {error_line(exc)}") from None
    return 0

