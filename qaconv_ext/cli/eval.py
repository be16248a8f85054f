"""``qaconv eval``: evaluate a trained model (this package's or a public QAConv checkpoint) on a dataset."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .common import (
    CommandError,
    add_dataset_command,
    add_postprocess_args,
    check_time_stamps,
    check_writable_folder,
    evaluate_or_exit,
    json_path,
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
               "of the public QAConv code (give --arch, --height, --width for the latter). Only the query and "
               "gallery folders are read, so a test-only copy of a dataset will do.")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command."""
    p = add_dataset_command(subparsers, "eval", "evaluate a trained model on a dataset", DESCRIPTION,
                            defaults=False)
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file (or a run folder holding checkpoint.pt)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="run folder holding checkpoint.pt (alternative to --checkpoint)")
    add_postprocess_args(p)
    p.add_argument("--json", type=json_path, default=None, metavar="FILE.json", help="write the rows as JSON here")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv eval``."""
    path = args.checkpoint or args.checkpoint_dir
    if not path:
        raise CommandError(f"{COMMAND}: give --checkpoint FILE or --checkpoint-dir DIR")
    device = resolve_device(args.device, COMMAND)
    if args.pretrained:
        print(f"{COMMAND}: --pretrained is ignored (the checkpoint holds the trained weights)")
    if args.combine_all:
        print(f"{COMMAND}: --combine-all is ignored (it merges MSMT17's sets for training)")
    if args.json:
        check_writable_folder(os.path.dirname(os.path.abspath(args.json)), "--json", COMMAND)
    backbone, head, cfg = load_model_or_exit(path, COMMAND, arch=args.arch, neck=args.neck, height=args.height,
                                             width=args.width, layout=args.layout)
    note_postprocessing(head, args.rerank, args.tlift, COMMAND)
    ds = load_dataset(args.dataset, args.data_root, verbose=True, splits=("query", "gallery"),
                      skip_bad_images=args.skip_bad_images, command=COMMAND)
    if args.tlift and head is not None:
        check_time_stamps(ds, args.dataset, COMMAND)
    rows = evaluate_or_exit(COMMAND, backbone, head, ds, int(cfg["height"]), int(cfg["width"]), device=device,
                            batch_size=args.batch_size, workers=args.workers, rerank=args.rerank,
                            tlift=args.tlift, progress=not args.no_progress)
    print_table(rows, f"{os.path.basename(cfg['checkpoint'])} on {args.dataset}")
    if args.json:
        print(f"results: {write_json(args.json, rows)}")
    return 0
