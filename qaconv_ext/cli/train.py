"""``qaconv train``: train QAConv (or the GAP baseline) on a re-id dataset, checkpointing every epoch."""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Optional

from .common import (
    DATASET_CHOICES,
    MODEL_OPTIONS,
    add_dataset_command,
    add_postprocess_args,
    load_dataset,
    model_defaults,
    note_postprocessing,
    print_table,
    resolve_device,
    write_json,
)

__all__ = ["register", "run", "config_from_args", "settle_model_options", "resolve_test_root"]

COMMAND = "qaconv train"
DESCRIPTION = ("Train a QAConv model with the class-memory loss (paper recipe by default: SGD, lr 0.01 for new layers "
               "and 0.001 for a pretrained trunk, x0.1 after 40 epochs, 60 epochs, Random Block). A checkpoint is "
               "written atomically after every epoch; --resume continues exactly.")


def _synthetic(name: str) -> bool:
    return name.startswith("synthetic")


def resolve_test_root(args: argparse.Namespace) -> Optional[str]:
    """``--test-root``; else ``--data-root`` when both datasets are synthetic or both real; else None
    (the test dataset's own default)."""
    if args.test_root:
        return args.test_root
    if args.data_root and _synthetic(args.dataset) == _synthetic(args.test_dataset):
        return args.data_root
    return None


def settle_model_options(args: argparse.Namespace, saved: Optional[Dict[str, Any]] = None,
                         command: str = COMMAND) -> List[str]:
    """Fill the :data:`MODEL_OPTIONS` not given on the command line: from ``saved`` (the config of the
    checkpoint to resume), else the defaults; returns the options taken from ``saved``.

    Given options that differ from ``saved`` end the command with one line naming them.
    """
    saved = saved or {}
    defaults = model_defaults()
    conflicts, adopted = [], []
    for key in MODEL_OPTIONS:
        if not hasattr(args, key):
            continue
        given, old = getattr(args, key), saved.get(key)
        if key == "ibn" and saved:   # a checkpoint's plain trunk is a setting too
            old = old or "none"
        flag = "--" + key.replace("_", "-")
        if given is None:
            setattr(args, key, defaults[key] if old is None else old)
            if old is not None:
                adopted.append(f"{flag} {old}")
        elif old is not None and given != old:
            conflicts.append(f"{flag} {given} (checkpoint: {old})")
    if conflicts:
        raise SystemExit(f"{command}: --resume: the checkpoint was trained with other model options: "
                         f"{', '.join(conflicts)}; drop them to continue it, or use another --checkpoint-dir")
    return adopted


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command."""
    p = add_dataset_command(subparsers, "train", "train QAConv (or the GAP baseline) on a dataset", DESCRIPTION)
    p.add_argument("--method", choices=("qaconv", "baseline"), default=None,
                   help="qaconv: class-memory loss; baseline: GAP + cosine softmax (default: qaconv)")
    p.add_argument("--epochs", type=int, default=60, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of new layers (default: %(default)s)")
    p.add_argument("--base-lr-mult", type=float, default=None,
                   help="trunk lr = lr x this (default: 0.1 with --pretrained, else 1)")
    p.add_argument("--step-size", type=int, default=40, help="epochs between x0.1 decays (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-random-block", action="store_true", help="no Random Block augmentation")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    p.add_argument("--freeze-bn", action="store_true", help="keep the backbone's BatchNorms frozen (eval mode)")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_true", default=None, help="mixed precision: float16 on CUDA (default there), bfloat16 on the CPU")
    amp.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=os.path.join("runs", "train"),
                   help="where checkpoint.pt is written every epoch (default: %(default)s)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from a checkpoint (default with no PATH: --checkpoint-dir/checkpoint.pt); "
                        "model options not given are taken from it")
    p.add_argument("--test-dataset", choices=DATASET_CHOICES, default=None,
                   help="evaluate on this dataset after training (read before training starts)")
    p.add_argument("--test-root", default=None,
                   help="its folder (default: --data-root when both datasets are synthetic or both real, "
                        "else as --data-root's default)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: the backbone's BatchNorms use the statistics of the global batch")
    add_postprocess_args(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace, device: str) -> "TrainConfig":  # noqa: F821
    """A :class:`~qaconv_ext.engine.TrainConfig` from parsed ``train`` arguments whose model options
    are settled (:func:`settle_model_options`), for ``device`` (:func:`resolve_device`)."""
    from ..engine import TrainConfig

    from ..models import IBN_ARCHITECTURES

    if args.ibn not in (None, "none") and args.arch not in IBN_ARCHITECTURES:
        raise SystemExit(f"{COMMAND}: --ibn {args.ibn}: IBN-Net exists for {', '.join(IBN_ARCHITECTURES)}, "
                         f"not for --arch {args.arch}")
    return TrainConfig(
        method=args.method, arch=args.arch, pretrained=args.pretrained, neck=args.neck, layout=args.layout,
        ibn=None if args.ibn in (None, "none") else args.ibn, neck_type=args.neck_type,
        preprocess=args.preprocess, augment=args.augment,
        height=args.height, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        base_lr_mult=args.base_lr_mult, step_size=args.step_size, weight_decay=args.weight_decay,
        random_block=not args.no_random_block, flip=not args.no_flip, freeze_bn=args.freeze_bn,
        clip_grad=args.clip_grad, amp=args.amp, workers=args.workers, seed=args.seed,
        device=device, dataset=args.dataset, data_root=args.data_root or "")


def _resume_config(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """``{"path", "config"}`` of the checkpoint that ``--resume`` names (read before training, so that a
    wrong file or folder ends the command at once), or None without ``--resume``."""
    from ..engine import CheckpointError, find_checkpoint, load_checkpoint
    from ..engine.checkpoint import missing_checkpoint_message

    if not args.resume:
        return None
    target = args.checkpoint_dir if args.resume == "auto" else args.resume
    path = find_checkpoint(target)
    if path is None:
        raise SystemExit(f"{COMMAND}: --resume: {missing_checkpoint_message(target)}")
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CheckpointError as exc:
        raise SystemExit(f"{COMMAND}: --resume: {exc}") from None
    if "config" not in ckpt and "format" not in ckpt and "model" in ckpt:
        raise SystemExit(f"{COMMAND}: --resume: {path} was written by the public QAConv code; it can be "
                         f"evaluated (qaconv eval --checkpoint {path}) but not resumed here")
    saved = dict(ckpt.get("config") or {})
    saved.setdefault("preprocess", "imagenet")   # checkpoints from before the presets used ImageNet mean/std
    return {"path": path, "config": saved}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv train``; under ``torchrun`` training is data-parallel across the ranks
    (``--batch-size`` is the global batch) and rank 0 prints and writes the checkpoint."""
    from ..distributed import DistributedTraining, join_if_launched, main_rank_output, shutdown

    device = resolve_device(args.device, COMMAND)
    options = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    env = join_if_launched(device, options, COMMAND)
    try:
        with main_rank_output(env):
            dist = None if env is None else DistributedTraining(env, sync_bn=args.sync_bn)
            return _train(args, device if env is None else str(env.device), dist)
    finally:
        if env is not None:
            shutdown()


def _train(args: argparse.Namespace, device: str, dist: Any) -> int:
    """Everything that can fail before the first epoch is checked first: the device, the checkpoint to
    resume and its model options, the training and the test dataset."""
    from ..engine import run_training

    if args.sync_bn and dist is None:
        print(f"{COMMAND}: note: --sync-bn applies to training across processes (torchrun); ignored")
    resume = _resume_config(args)
    adopted = settle_model_options(args, resume["config"] if resume else None)
    if adopted:
        print("from the checkpoint: " + " ".join(adopted))
    cfg = config_from_args(args, device)
    ds = load_dataset(args.dataset, args.data_root, args.combine_all, verbose=True)
    saved_ids = (resume or {}).get("config", {}).get("num_classes")
    if saved_ids is not None and int(saved_ids) != ds.num_train_pids:
        raise SystemExit(f"{COMMAND}: --resume: the checkpoint was trained on {saved_ids} identities, "
                         f"--dataset {args.dataset} has {ds.num_train_pids}")
    extra: Dict[str, Any] = {"train_root": ds.root}
    test = None
    if args.test_dataset:
        test = load_dataset(args.test_dataset, resolve_test_root(args), verbose=True, option="--test-root")
        extra.update(test_dataset=args.test_dataset, test_root=test.root)
    where = "" if dist is None else f" x {dist.world_size} processes"
    print("training " + ", ".join(cfg.summary()) + f" on {cfg.device}{where}; {len(ds.train)} images, "
          f"{ds.num_train_pids} identities")
    t0 = time.time()
    trainer = run_training(cfg, ds.train, ds.num_train_pids, checkpoint_dir=args.checkpoint_dir,
                           resume=resume["path"] if resume else None, extra_config=extra,
                           progress=not args.no_progress and (dist is None or dist.is_main), dist=dist)
    print(f"trained in {time.time() - t0:.0f} s; checkpoint: {trainer.checkpoint_path}")
    if test is not None:
        from ..evaluation import evaluate_trained

        head = getattr(trainer.criterion, "matcher", None)
        note_postprocessing(head, args.rerank, args.tlift, COMMAND)
        evaluate = evaluate_trained
        if dist is not None:
            from ..distributed import sharded_evaluate_trained as evaluate
        rows = evaluate(trainer.model, head, test, cfg.height, cfg.width, device=cfg.device,
                        batch_size=max(64, cfg.batch_size), workers=cfg.workers, rerank=args.rerank,
                        tlift=args.tlift, progress=not args.no_progress)
        if rows is None:  # not the main rank
            return 0
        print_table(rows, f"{args.dataset} -> {args.test_dataset}")
        out = write_json(os.path.join(args.checkpoint_dir, f"results_{args.test_dataset}.json"), rows)
        print(f"results: {out}")
    return 0
