"""``qaconv eval``: evaluate a trained model (this package's or a public QAConv checkpoint) on a dataset."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .common import (
    add_dataset_command,
    add_postprocess_args,
    add_rerank_mode_arg,
    load_dataset,
    load_model_or_exit,
    note_postprocessing,
    print_table,
    resolve_device,
    write_json,
)

__all__ = ["register", "run"]

COMMAND = "qaconv eval"
DESCRIPTION = ("Extract features, score the query set against the gallery with the fused QAConv op and report "
               "Rank-1/5/10, mAP and mINP (Market-1501 protocol). Reads this package's checkpoints and those "
               "of the public QAConv code (any version; the backbone is inferred from the weights; give --height and "
               "--width for public models trained at another size than 384 x 128).")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command."""
    p = add_dataset_command(subparsers, "eval", "evaluate a trained model on a dataset", DESCRIPTION,
                            defaults=False)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (or a folder holding checkpoint.pt or the public code's checkpoint.pth.tar)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="folder holding checkpoint.pt or checkpoint.pth.tar (alternative to --checkpoint)")
    add_postprocess_args(p)
    add_rerank_mode_arg(p)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv eval``."""
    from ..evaluation import evaluate_trained

    path = args.checkpoint or args.checkpoint_dir
    if not path:
        raise SystemExit(f"{COMMAND}: give --checkpoint FILE or --checkpoint-dir DIR")
    device = resolve_device(args.device, COMMAND)
    if args.pretrained:
        print(f"{COMMAND}: --pretrained is ignored (the checkpoint holds the trained weights)")
    backbone, head, cfg = load_model_or_exit(path, COMMAND, arch=args.arch, neck=args.neck, height=args.height,
                                             width=args.width, layout=args.layout, ibn=args.ibn,
                                             neck_type=args.neck_type, preprocess=args.preprocess)
    note_postprocessing(head, args.rerank, args.tlift, COMMAND)
    ds = load_dataset(args.dataset, args.data_root, args.combine_all, verbose=True)
    rows = evaluate_trained(backbone, head, ds, int(cfg["height"]), int(cfg["width"]), device=device,
                            batch_size=args.batch_size, workers=args.workers, rerank=args.rerank,
                            tlift=args.tlift, progress=not args.no_progress, rerank_mode=args.rerank_mode)
    print_table(rows, f"{os.path.basename(cfg['checkpoint'])} on {args.dataset}")
    if args.json:
        print(f"results: {write_json(args.json, rows)}")
    return 0
