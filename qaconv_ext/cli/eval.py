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
    """Entry point of ``qaconv eval``; under ``torchrun`` the work is split across the ranks and rank 0
    prints and writes the results."""
    from ..distributed import join_if_launched, main_rank_output, shutdown

    path = args.checkpoint or args.checkpoint_dir
    if not path:
        raise SystemExit(f"{COMMAND}: give --checkpoint FILE or --checkpoint-dir DIR")
    device = resolve_device(args.device, COMMAND)
    env = join_if_launched(device, _shared_options(args, path), COMMAND)
    try:
        with main_rank_output(env):
            return _evaluate(args, path, device if env is None else str(env.device), env)
    finally:
        if env is not None:
            shutdown()


def _shared_options(args: argparse.Namespace, path: str) -> dict:
    """The options every rank must agree on."""
    keys = ("dataset", "data_root", "combine_all", "arch", "neck", "height", "width", "layout", "batch_size",
            "rerank", "tlift")
    return {"checkpoint": os.path.abspath(path), **{k: getattr(args, k, None) for k in keys}}


def _evaluate(args: argparse.Namespace, path: str, device: str, env: Any) -> int:
    from ..evaluation import evaluate_trained

    if args.pretrained:
        print(f"{COMMAND}: --pretrained is ignored (the checkpoint holds the trained weights)")
    backbone, head, cfg = load_model_or_exit(path, COMMAND, arch=args.arch, neck=args.neck, height=args.height,
                                             width=args.width, layout=args.layout, ibn=args.ibn,
                                             neck_type=args.neck_type, preprocess=args.preprocess)
    note_postprocessing(head, args.rerank, args.tlift, COMMAND)
    ds = load_dataset(args.dataset, args.data_root, args.combine_all, verbose=True)
    kwargs = dict(device=device, batch_size=args.batch_size, workers=args.workers, rerank=args.rerank,
                  tlift=args.tlift, progress=not args.no_progress, rerank_mode=args.rerank_mode)
    if env is None:
        rows = evaluate_trained(backbone, head, ds, int(cfg["height"]), int(cfg["width"]), **kwargs)
    else:
        from ..distributed import sharded_evaluate_trained

        rows = sharded_evaluate_trained(backbone, head, ds, int(cfg["height"]), int(cfg["width"]), **kwargs)
        if not env.is_main:
            return 0
    where = "" if env is None else f" ({env.world_size} processes)"
    print_table(rows, f"{os.path.basename(cfg['checkpoint'])} on {args.dataset}{where}")
    if args.json:
        out = rows if env is None else {**rows, "world_size": env.world_size}
        print(f"results: {write_json(args.json, out)}")
    return 0
