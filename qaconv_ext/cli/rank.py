"""``qaconv rank``: draw a query's top-k gallery images ranked by a trained QAConv model."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional

from .common import (PICTURES_DIR, CommandError, add_checkpoint_args, check_writable_folder, load_qaconv, picture_path,
                     positive_int, resolve_device)

DEFAULT_SYNTHETIC_ROOT = os.path.join("data_cache", "synthetic")
_DATASET_KEYS = ("test_root", "target_root", "eval_root", "dataset_root", "data_dir")
#: Readers for a dataset folder (the names ``train``/``eval`` use); ``duke`` is an alias.
READER_CHOICES = ("market1501", "dukemtmcreid", "msmt17", "folder")
_READER_ALIASES = {"duke": "dukemtmcreid"}


def dataset_type(text: str) -> str:
    """``argparse`` type of ``--dataset-type``: the reader's name (old aliases accepted)."""
    return _READER_ALIASES.get(text.lower(), text.lower())


def recorded_reader(config: Dict[str, Any]) -> Optional[str]:
    """The reader for the test set recorded in a checkpoint's config (``test_dataset``), if any."""
    name = config.get("test_dataset")
    if not name:
        return None
    return "market1501" if str(name).startswith("synthetic") else dataset_type(str(name))


def resolve_dataset(spec: Any, config: Dict[str, Any], kind: Optional[str] = None,
                    synthetic_root: Optional[str] = None) -> "ReIDDataset":  # noqa: F821
    """The dataset to rank in.

    ``spec`` is a dataset folder (read with ``kind``, Market-1501 layout by default),
    ``"synthetic"`` or ``"synthetic:domain_a"`` / ``"synthetic:domain_b"`` for the built-in camera
    network under ``synthetic_root`` (generated if missing; ``domain_b`` by default, the domain the
    demo evaluates on), or None for the test set recorded in the checkpoint's config (its folder,
    read with its type unless ``kind`` is given), else the synthetic ``domain_b``.
    """
    from ..data import build_dataset, make_synthetic_network

    if spec is None:
        spec = next((config[k] for k in _DATASET_KEYS if config.get(k)), None)
        if spec is not None:
            kind = kind or recorded_reader(config)
        else:
            spec = "synthetic"
            print("qaconv rank: no --dataset given; using the built-in synthetic data (domain_b)")
    spec = str(spec)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        domain = spec.partition(":")[2] or "domain_b"
        if domain not in ("domain_a", "domain_b"):
            raise CommandError(f"qaconv rank: unknown synthetic domain {domain!r} (domain_a or domain_b)")
        root = synthetic_root or config.get("synthetic_root") or DEFAULT_SYNTHETIC_ROOT
        spec = make_synthetic_network(root)[domain]
    if not os.path.isdir(spec):
        raise CommandError(f"qaconv rank: dataset folder not found: {spec}")
    kind = kind or "market1501"
    try:
        return build_dataset(kind, spec, splits=("query", "gallery"))
    except (OSError, ValueError, KeyError) as exc:
        raise CommandError(f"qaconv rank: cannot read dataset {spec}: {exc}") from None


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``rank`` sub-command to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "rank", help="draw a query and its top-k gallery images",
        description="Rank a dataset's gallery for one query with a trained QAConv model and draw the top k, "
                    "true matches framed green, false ones red.")
    add_checkpoint_args(p)
    p.add_argument("--dataset", default=None,
                   help="dataset folder (Market-1501 layout unless --dataset-type), or 'synthetic[:domain_a|"
                        "domain_b]' for the built-in camera network; default: the test set recorded in the "
                        "checkpoint, else synthetic:domain_b")
    p.add_argument("--dataset-type", type=dataset_type, choices=READER_CHOICES, default=None,
                   help="reader for the folder: market1501, dukemtmcreid (alias duke), msmt17, folder "
                        "(default: the recorded test set's type, else market1501)")
    p.add_argument("--synthetic-root", default=None,
                   help="where the built-in synthetic network lives (default: the checkpoint's, else "
                        f"{DEFAULT_SYNTHETIC_ROOT})")
    p.add_argument("--query-index", type=int, default=0, help="which query to rank (default: %(default)s)")
    p.add_argument("-k", "--top", type=positive_int, default=10, dest="k",
                   help="gallery images to show (default: %(default)s)")
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

    device = resolve_device(args.device, "qaconv rank")
    check_writable_folder(os.path.dirname(os.path.abspath(args.output)), "-o", "qaconv rank")
    model, head, cfg = load_qaconv(args.checkpoint, device, "qaconv rank")
    ds = resolve_dataset(args.dataset, cfg, args.dataset_type, args.synthetic_root)
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
