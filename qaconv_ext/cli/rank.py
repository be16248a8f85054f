"""``qaconv rank``: draw a query's top-k gallery images ranked by a trained QAConv model."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Dict, Optional, Tuple

from .common import (DATASET_CHOICES, MAX_PICTURE_RANKS, PICTURES_DIR, CommandError, add_checkpoint_args,
                     check_picture_ranks, check_writable_folder, load_dataset, load_qaconv, picture_path, positive_int,
                     resolve_device)

COMMAND = "qaconv rank"
_DATASET_KEYS = ("test_root", "target_root", "eval_root", "dataset_root", "data_dir")
#: Readers for a dataset folder (the names ``train``/``eval`` use); ``duke`` is an alias.
READER_CHOICES = ("market1501", "dukemtmcreid", "msmt17", "folder")
_READER_ALIASES = {"duke": "dukemtmcreid"}
_SYNTHETIC_SPECS = {"synthetic": "synthetic-b", "synthetic:domain_b": "synthetic-b", "synthetic:domain_a": "synthetic-a"}


def dataset_type(text: str) -> str:
    """``argparse`` type of ``--dataset-type`` (deprecated): the reader's name (old aliases accepted)."""
    return _READER_ALIASES.get(text.lower(), text.lower())


def recorded_reader(config: Dict[str, Any]) -> Optional[str]:
    """The reader for the test set recorded in a checkpoint's config (``test_dataset``), if any."""
    name = config.get("test_dataset")
    if not name:
        return None
    return "market1501" if str(name).startswith("synthetic") else dataset_type(str(name))


def _recorded_folder(config: Dict[str, Any]) -> Optional[str]:
    return next((str(config[k]) for k in _DATASET_KEYS if config.get(k)), None)


def _deprecated(old: str, new: str) -> None:
    print(f"{COMMAND}: note: {old} is deprecated and will be removed; use {new}", file=sys.stderr)


def dataset_options(dataset: Optional[str], data_root: Optional[str], config: Dict[str, Any], *,
                    dataset_type: Optional[str] = None, synthetic_root: Optional[str] = None
                    ) -> Tuple[Optional[str], Optional[str]]:
    """``(--dataset NAME, --data-root DIR)`` from the options as given, the old spellings included:
    ``--dataset FOLDER [--dataset-type TYPE]``, ``--dataset synthetic[:domain_a|domain_b]`` and
    ``--synthetic-root DIR`` still work and print a note that names the new spelling."""
    if synthetic_root is not None:
        _deprecated("--synthetic-root DIR", "--data-root DIR")
        if data_root is not None and data_root != synthetic_root:
            raise CommandError(f"{COMMAND}: give --data-root only (--synthetic-root is its deprecated spelling)")
        data_root = synthetic_root
    name = None if dataset is None else _READER_ALIASES.get(dataset.lower(), dataset.lower())
    if name in _SYNTHETIC_SPECS:
        _deprecated(f"--dataset {dataset}", f"--dataset {_SYNTHETIC_SPECS[name]}")
        name = _SYNTHETIC_SPECS[name]
    elif dataset is not None and name not in DATASET_CHOICES:
        if name.startswith("synthetic:"):
            raise CommandError(f"{COMMAND}: unknown synthetic domain {dataset.partition(':')[2]!r} (domain_a or "
                               "domain_b; or --dataset synthetic-a / synthetic-b)")
        if not os.path.isdir(dataset):
            raise CommandError(f"{COMMAND}: --dataset {dataset}: not a dataset name ({', '.join(DATASET_CHOICES)}) "
                               "nor a dataset folder")
        if data_root is not None:
            raise CommandError(f"{COMMAND}: --dataset takes a name when --data-root gives the folder")
        name, data_root = dataset_type or "market1501", dataset
        _deprecated("--dataset FOLDER", f"--dataset {name} --data-root {shlex.quote(dataset)}")
        return name, data_root
    if dataset_type is not None:
        if name is not None:
            raise CommandError(f"{COMMAND}: --dataset-type is the deprecated spelling of --dataset NAME; give one")
        folder = data_root or _recorded_folder(config)
        _deprecated("--dataset-type TYPE", f"--dataset {dataset_type}"
                    + (f" --data-root {shlex.quote(folder)}" if folder else ""))
        return dataset_type, folder
    return name, data_root


def _read_folder(kind: str, folder: str) -> "ReIDDataset":  # noqa: F821
    from ..data import build_dataset

    if not os.path.isdir(folder):
        raise CommandError(f"{COMMAND}: dataset folder not found: {folder}")
    try:
        return build_dataset(kind, folder, splits=("query", "gallery"))
    except (OSError, ValueError, KeyError) as exc:
        raise CommandError(f"{COMMAND}: cannot read dataset {folder}: {exc}") from None


def resolve_dataset(name: Optional[str], config: Dict[str, Any], root: Optional[str] = None
                    ) -> "ReIDDataset":  # noqa: F821
    """The query and gallery sets to rank in: dataset ``name`` (:data:`~qaconv_ext.cli.common.DATASET_CHOICES`)
    under ``root``, read as ``qaconv eval`` reads it.

    Without ``name``: the test set recorded in the checkpoint (``test_dataset``; a public checkpoint may
    record only a folder, read in the Market-1501 layout), else ``synthetic-b`` (the domain the demo
    evaluates on). Without ``root``: the recorded test set's own folder when ``name`` is that set, the
    checkpoint's ``synthetic_root`` for synthetic data, else as ``qaconv eval`` (``$QACONV_DATA``).
    """
    recorded_name, recorded = config.get("test_dataset"), _recorded_folder(config)
    if name is None and not recorded_name:
        if recorded is not None or root is not None:
            return _read_folder("market1501", root or recorded)
        name = "synthetic-b"
        print(f"{COMMAND}: no --dataset given; using the built-in synthetic data (synthetic-b)")
    name = name or str(recorded_name)
    synthetic = name.startswith("synthetic")
    if root is None and name == recorded_name and recorded is not None and os.path.isdir(recorded):
        return _read_folder("market1501" if synthetic else dataset_type(name), recorded)
    if synthetic and root is None:
        root = config.get("synthetic_root") or None
    return load_dataset(name, root, verbose=False, splits=("query", "gallery"), command=COMMAND)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``rank`` sub-command to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "rank", help="draw a query and its top-k gallery images",
        description="Rank a dataset's gallery for one query with a trained QAConv model and draw the top k, "
                    "true matches framed green, false ones red.")
    add_checkpoint_args(p)
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help=f"dataset to rank in: {', '.join(DATASET_CHOICES)} (synthetic-a/-b: the built-in camera "
                        "network); default: the test set recorded in the checkpoint, else synthetic-b")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="the dataset's folder, as for `qaconv eval` (default: the checkpoint's recorded test set "
                        "folder or synthetic data; else $QACONV_DATA, for synthetic $QACONV_DATA/synthetic or "
                        "data_cache/synthetic)")
    p.add_argument("--dataset-type", type=dataset_type, choices=READER_CHOICES, default=None,
                   help="deprecated: use --dataset NAME --data-root DIR")
    p.add_argument("--synthetic-root", default=None, metavar="DIR", help="deprecated: use --data-root DIR")
    p.add_argument("--query-index", type=int, default=0, help="which query to rank (default: %(default)s)")
    p.add_argument("-k", "--top", type=positive_int, default=10, dest="k",
                   help=f"gallery images to show, at most {MAX_PICTURE_RANKS} (default: %(default)s)")
    p.add_argument("--max-gallery", type=positive_int, default=None, metavar="N",
                   help="rank only the first N >= 1 gallery images (quick looks at large galleries on a CPU; "
                        "default: all)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per feature batch (default: %(default)s)")
    p.add_argument("--correspondences", action="store_true",
                   help="also draw the correspondences with the top-ranked image (next to the output, *_top1.png)")
    p.add_argument("-o", "--output", type=picture_path, default=os.path.join(PICTURES_DIR, "ranked_list.png"),
                   help="picture to write, .png or .jpg (default: %(default)s)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv rank``."""
    import numpy as np

    from ..evaluation import extract_features
    from ..viz import average_match, draw_correspondences, draw_ranked_list
    from .pictures import rank_query

    check_picture_ranks(args.k, COMMAND)
    device = resolve_device(args.device, COMMAND)
    check_writable_folder(os.path.dirname(os.path.abspath(args.output)), "-o", COMMAND)
    model, head, cfg = load_qaconv(args.checkpoint, device, COMMAND)
    name, root = dataset_options(args.dataset, args.data_root, cfg, dataset_type=args.dataset_type,
                                 synthetic_root=args.synthetic_root)
    ds = resolve_dataset(name, cfg, root)
    if not ds.query or not ds.gallery:
        raise CommandError(f"qaconv rank: {ds.root} has no query or no gallery images")
    if not 0 <= args.query_index < len(ds.query):
        raise CommandError(f"qaconv rank: --query-index {args.query_index} out of range: "
                         f"the dataset has {len(ds.query)} queries (0..{len(ds.query) - 1})")
    gallery = ds.gallery if args.max_gallery is None else ds.gallery[:args.max_gallery]
    q = ds.query[args.query_index]
    h, w = cfg["height"], cfg["width"]
    g_fea = extract_features(model, gallery, h, w, batch_size=args.batch_size, device=device,
                             progress=len(gallery) > 2000, desc="gallery features", preprocess=cfg["preprocess"])
    ranking = rank_query(model, head, q, gallery, g_fea, h, w, device, preprocess=cfg["preprocess"])
    q_fea, scores, junk, matches, order = (ranking.features, ranking.scores, ranking.junk, ranking.matches,
                                           ranking.order)
    n_rel = int(np.sum(matches & ~junk))
    title = (f"query {args.query_index} (id {q.pid}, camera {q.camid + 1}) of {os.path.basename(ds.root)}: "
             f"top {min(args.k, int(np.sum(~junk)))} of {int(np.sum(~junk))}; "
             f"{n_rel} true match{'es' if n_rel != 1 else ''} in the gallery")
    img = draw_ranked_list(q, gallery, scores, matches, k=args.k, ignore=junk, title=title)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    img.save(args.output)
    first_hit = next((r for r, i in enumerate(order, start=1) if matches[i]), None)
    print(f"query {args.query_index}: first true match at rank {first_hit}; -> {args.output}")
    if args.correspondences and len(order):
        top = int(order[0])
        stem, ext = os.path.splitext(args.output)
        out2 = f"{stem}_top1{ext or '.png'}"
        # coloured by the contributions above the query's average match over the gallery
        draw_correspondences(q, gallery[top], q_fea[0], g_fea[top], head=head,
                             reference=average_match(q_fea, g_fea), image_size=(h, w)).save(out2)
        print(f"correspondences with rank 1 -> {out2}")
    return 0
