"""``qaconv train``: train QAConv (or the GAP baseline) on a re-id dataset, checkpointing every epoch.

Also home of the data/model options and the dataset loader shared with ``qaconv eval``.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, Optional

from .output import write_json

DATASET_CHOICES = ("market1501", "dukemtmcreid", "msmt17", "synthetic-a", "synthetic-b", "folder")


def default_data_root() -> Optional[str]:
    """``$QACONV_DATA`` when set, else None."""
    return os.environ.get("QACONV_DATA") or None


def default_synthetic_root() -> str:
    """Where the built-in synthetic network is cached: ``$QACONV_DATA/synthetic`` or ``data_cache/synthetic``."""
    root = default_data_root()
    return os.path.join(root, "synthetic") if root else os.path.join("data_cache", "synthetic")


def load_dataset(name: str, root: Optional[str] = None, combine_all: bool = False, verbose: bool = True) -> Any:
    """Load ``name`` (one of :data:`DATASET_CHOICES`) from ``root``.

    ``synthetic-a``/``synthetic-b`` are the two domains of the built-in camera network under ``root``
    (default :func:`default_synthetic_root`), generated on first use. Real datasets read ``root``
    (default ``$QACONV_DATA``), which may be the dataset folder or the folder that contains it.
    """
    from ..data import Market1501, build_dataset, make_synthetic_network

    name = name.lower()
    if name in ("synthetic-a", "synthetic-b"):
        root = root or default_synthetic_root()
        paths = make_synthetic_network(root, progress=verbose)
        ds = Market1501(paths["domain_a" if name.endswith("a") else "domain_b"])
    else:
        root = root or default_data_root()
        if not root:
            raise SystemExit(f"qaconv: --data-root is required for {name} (or set $QACONV_DATA)")
        kwargs: Dict[str, Any] = {"combine_all": True} if (name == "msmt17" and combine_all) else {}
        try:
            ds = build_dataset(name, root, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"qaconv: cannot read {name} from {root}: {exc}") from None
    if verbose:
        print(ds.summary())
    return ds


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--dataset``, ``--data-root``, ``--combine-all``."""
    p.add_argument("--dataset", choices=DATASET_CHOICES, required=required,
                   help="dataset to use (synthetic-a/-b: the built-in camera network, generated on first use)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder or the folder containing it (default: $QACONV_DATA; synthetic: "
                        "$QACONV_DATA/synthetic or data_cache/synthetic)")
    p.add_argument("--combine-all", action="store_true", help="MSMT17: train on all 4,101 identities")


def add_model_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--arch``, ``--pretrained``, ``--neck``, ``--layout``, ``--height``, ``--width``, ``--batch-size``, ``--device``."""
    from ..models import ARCHITECTURES

    d = (lambda v: v) if defaults else (lambda v: None)  # noqa: E731
    p.add_argument("--arch", choices=ARCHITECTURES, default=d("resnet50"), help="backbone (default: %(default)s)")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local file with ImageNet weights in torchvision naming (nothing is downloaded)")
    p.add_argument("--neck", type=int, default=d(128), help="neck channels (default: %(default)s)")
    p.add_argument("--layout", choices=("v2", "eccv"), default=d("v2"), help="QAConv head layout (default: %(default)s)")
    p.add_argument("--height", type=int, default=d(384), help="input height (default: %(default)s)")
    p.add_argument("--width", type=int, default=d(128), help="input width (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d(32), help="images per batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_device(device: Optional[str]) -> str:
    """The requested device, or ``cuda`` when available, else ``cpu``."""
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command."""
    p = subparsers.add_parser(
        "train", help="train QAConv (or the GAP baseline) on a dataset",
        description="Train a QAConv model with the class-memory loss (paper recipe by default: SGD, lr 0.01 for "
                    "new layers and 0.001 for a pretrained trunk, x0.1 after 40 epochs, 60 epochs, Random Block). "
                    "A checkpoint is written atomically after every epoch; --resume continues exactly.")
    add_data_args(p)
    add_model_args(p)
    p.add_argument("--method", choices=("qaconv", "baseline"), default="qaconv",
                   help="qaconv: class-memory loss; baseline: GAP + cosine softmax (default: %(default)s)")
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
    amp.add_argument("--amp", dest="amp", action="store_true", default=None, help="mixed precision (CUDA)")
    amp.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=os.path.join("runs", "train"),
                   help="where checkpoint.pt is written every epoch (default: %(default)s)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from a checkpoint (default with no PATH: --checkpoint-dir/checkpoint.pt)")
    p.add_argument("--test-dataset", choices=DATASET_CHOICES, default=None,
                   help="evaluate on this dataset after training")
    p.add_argument("--test-root", default=None, help="its folder (default as for --data-root)")
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    p.add_argument("--tlift", action="store_true", help="also report re-ranking + TLift (needs time stamps)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> "TrainConfig":  # noqa: F821
    """A :class:`~qaconv_ext.engine.TrainConfig` from parsed ``train`` arguments."""
    from ..engine import TrainConfig

    return TrainConfig(
        method=args.method, arch=args.arch, pretrained=args.pretrained, neck=args.neck, layout=args.layout,
        height=args.height, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        base_lr_mult=args.base_lr_mult, step_size=args.step_size, weight_decay=args.weight_decay,
        random_block=not args.no_random_block, flip=not args.no_flip, freeze_bn=args.freeze_bn,
        clip_grad=args.clip_grad, amp=args.amp, workers=args.workers, seed=args.seed,
        device=resolve_device(args.device), dataset=args.dataset, data_root=args.data_root or "")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv train``."""
    from ..engine import find_checkpoint, run_training

    cfg = config_from_args(args)
    ds = load_dataset(args.dataset, args.data_root, args.combine_all, verbose=True)
    resume = None
    if args.resume:
        target = args.checkpoint_dir if args.resume == "auto" else args.resume
        resume = find_checkpoint(target)
        if resume is None:
            raise SystemExit(f"qaconv train: --resume: no checkpoint at {target}")
    print("training " + ", ".join(cfg.summary()) + f" on {cfg.device}; {len(ds.train)} images, "
          f"{ds.num_train_pids} identities")
    extra = {"train_root": ds.root}
    t0 = time.time()
    trainer = run_training(cfg, ds.train, ds.num_train_pids, checkpoint_dir=args.checkpoint_dir, resume=resume,
                           extra_config=extra, progress=not args.no_progress)
    print(f"trained in {time.time() - t0:.0f} s; checkpoint: {trainer.checkpoint_path}")
    if args.test_dataset:
        from .eval import evaluate_trained, print_table

        test = load_dataset(args.test_dataset, args.test_root, verbose=True)
        rows = evaluate_trained(trainer.model, getattr(trainer.criterion, "matcher", None), cfg.to_dict(), test,
                                device=cfg.device, batch_size=max(64, cfg.batch_size), workers=cfg.workers,
                                rerank=args.rerank, tlift=args.tlift, progress=not args.no_progress)
        print_table(rows, f"{args.dataset} -> {args.test_dataset}")
        out = write_json(os.path.join(args.checkpoint_dir, f"results_{args.test_dataset}.json"), rows)
        print(f"results: {out}")
    return 0
