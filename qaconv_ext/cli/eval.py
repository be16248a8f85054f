"""``qaconv eval``: evaluate a trained model (this package's or a public QAConv checkpoint) on a dataset."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .common import (
    CommandError,
    add_dataset_command,
    add_postprocess_args,
    add_rerank_mode_arg,
    check_time_stamps,
    check_writable_folder,
    count_queries_or_exit,
    evaluate_or_exit,
    json_path,
    load_dataset,
    load_model_or_exit,
    note_postprocessing,
    print_table,
    resolve_device,
    with_counts,
    write_json,
)

__all__ = ["register", "run"]

COMMAND = "qaconv eval"
DESCRIPTION = ("Extract features, score the query set against the gallery with the fused QAConv op and report "
               "Rank-1/5/10, mAP and mINP (Market-1501 protocol). Reads this package's checkpoints and those "
               "of the public QAConv code (any version; the backbone is inferred from the weights; give --height and "
               "--width for public models trained at another size than 384 x 128). Only the query and gallery "
               "folders are read, so a test-only copy of a dataset will do.")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command."""
    p = add_dataset_command(subparsers, "eval", "evaluate a trained model on a dataset", DESCRIPTION,
                            defaults=False)
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="checkpoint file (or a run folder holding checkpoint.pt or the public code's "
                        "checkpoint.pth.tar)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="folder holding checkpoint.pt or checkpoint.pth.tar (alternative to --checkpoint)")
    add_postprocess_args(p)
    add_rerank_mode_arg(p)
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_true", default=None,
                     help="reduced precision: bfloat16 feature maps on the CPU (scored with float32 accumulation, "
                          "half the memory), float16 autocast on CUDA (the default there)")
    amp.add_argument("--no-amp", dest="amp", action="store_false", help="float32 throughout, also on CUDA")
    p.add_argument("--json", type=json_path, default=None, metavar="FILE.json", help="write the rows as JSON here")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv eval``; under ``torchrun`` the work is split across the ranks and rank 0
    prints and writes the results."""
    from ..distributed import join_if_launched, main_rank_output, shutdown

    path = args.checkpoint or args.checkpoint_dir
    if not path:
        raise CommandError(f"{COMMAND}: give --checkpoint FILE or --checkpoint-dir DIR")
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
            "rerank", "tlift", "skip_bad_images", "rerank_mode", "amp", "preprocess")
    return {"checkpoint": os.path.abspath(path), **{k: getattr(args, k, None) for k in keys}}


def _evaluate(args: argparse.Namespace, path: str, device: str, env: Any) -> int:
    if args.pretrained:
        print(f"{COMMAND}: --pretrained is ignored (the checkpoint holds the trained weights)")
    if args.combine_all:
        print(f"{COMMAND}: --combine-all is ignored (it merges MSMT17's sets for training)")
    if args.json:
        check_writable_folder(os.path.dirname(os.path.abspath(args.json)), "--json", COMMAND)
    backbone, head, cfg = load_model_or_exit(path, COMMAND, arch=args.arch, neck=args.neck, height=args.height,
                                             width=args.width, layout=args.layout, ibn=args.ibn,
                                             neck_type=args.neck_type, preprocess=args.preprocess)
    note_postprocessing(head, args.rerank, args.tlift, COMMAND)
    ds = load_dataset(args.dataset, args.data_root, verbose=True, splits=("query", "gallery"),
                      skip_bad_images=args.skip_bad_images, command=COMMAND)
    counts = count_queries_or_exit(ds, args.dataset, COMMAND)
    if args.tlift and head is not None:
        check_time_stamps(ds, args.dataset, COMMAND)
    kwargs = dict(device=device, batch_size=args.batch_size, workers=args.workers, rerank=args.rerank,
                  tlift=args.tlift, progress=not args.no_progress, rerank_mode=args.rerank_mode, amp=args.amp,
                  preprocess=cfg["preprocess"])
    if env is None:
        rows = evaluate_or_exit(COMMAND, backbone, head, ds, int(cfg["height"]), int(cfg["width"]), **kwargs)
    else:
        from ..distributed import sharded_evaluate_trained

        rows = evaluate_or_exit(COMMAND, backbone, head, ds, int(cfg["height"]), int(cfg["width"]),
                                evaluate=sharded_evaluate_trained, **kwargs)
        if not env.is_main:
            return 0
    where = "" if env is None else f" ({env.world_size} processes)"
    print_table(rows, f"{os.path.basename(cfg['checkpoint'])} on {args.dataset}{where}", counts)
    if args.json:
        rows = with_counts(rows, counts)
        out = rows if env is None else {**rows, "world_size": env.world_size}
        print(f"results: {write_json(args.json, out)}")
    return 0
