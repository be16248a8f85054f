"""``qaconv train``: train QAConv (or the GAP baseline) on a re-id dataset, checkpointing every epoch.

Also home of the data/model options and the dataset loader shared with ``qaconv eval``.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Optional

from .output import write_json

DATASET_CHOICES = ("market1501", "dukemtmcreid", "msmt17", "synthetic-a", "synthetic-b", "folder")

#: The options that define the model and its inputs; a resumed run takes them from the checkpoint.
MODEL_OPTIONS = ("method", "arch", "neck", "layout", "height", "width", "ibn", "neck_type", "preprocess", "augment")


def default_data_root() -> Optional[str]:
    """``$QACONV_DATA`` when set, else None."""
    return os.environ.get("QACONV_DATA") or None


def default_synthetic_root() -> str:
    """Where the built-in synthetic network is cached: ``$QACONV_DATA/synthetic`` or ``data_cache/synthetic``."""
    root = default_data_root()
    return os.path.join(root, "synthetic") if root else os.path.join("data_cache", "synthetic")


def load_dataset(name: str, root: Optional[str] = None, combine_all: bool = False, verbose: bool = True,
                 option: str = "--data-root") -> Any:
    """Load ``name`` (one of :data:`DATASET_CHOICES`) from ``root``.

    ``synthetic-a``/``synthetic-b`` are the two domains of the built-in camera network under ``root``
    (default :func:`default_synthetic_root`), generated on first use. Real datasets read ``root``
    (default ``$QACONV_DATA``), which may be the dataset folder or the folder that contains it.
    ``option`` is the command-line option that gives ``root`` (for the error messages).
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
            raise SystemExit(f"qaconv: {option} is required for {name} (or set $QACONV_DATA)")
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


def add_postprocess_args(p: argparse.ArgumentParser) -> None:
    """``--rerank``, ``--tlift``."""
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    p.add_argument("--tlift", action="store_true", help="also report re-ranking + TLift (needs time stamps)")


def model_defaults() -> Dict[str, Any]:
    """The :data:`MODEL_OPTIONS` of a fresh :class:`~qaconv_ext.engine.TrainConfig`."""
    from ..engine.config import TrainConfig

    cfg = TrainConfig()
    return {k: getattr(cfg, k) for k in MODEL_OPTIONS}


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--arch``, ``--ibn``, ``--neck-type``, ``--preprocess`` (``--augment`` for training), ``--pretrained``,
    ``--neck``, ``--layout``, ``--height``, ``--width``, ``--batch-size``, ``--device``.

    The model options parse to None when not given (so that ``train --resume`` can take them from the
    checkpoint); their help names the training default, or with ``defaults=False`` the checkpoint.
    """
    from ..data.transforms import AUGMENTATIONS, PREPROCESS_PRESETS
    from ..models import ARCHITECTURES, NECK_TYPES

    md = model_defaults()
    d = (lambda k: f"(default: {md[k]})") if defaults else (lambda k: "(default: from the checkpoint)")  # noqa: E731
    inferred = "(default: {})".format("none" if defaults else "inferred from the checkpoint's weights")
    p.add_argument("--arch", choices=ARCHITECTURES, default=None, help=f"backbone {d('arch')}")
    p.add_argument("--ibn", choices=("a", "b", "none"), default=None,
                   help=f"IBN-Net variant of a ResNet-18/34/50/101 trunk (QAConv 2.x uses b) {inferred}")
    p.add_argument("--neck-type", choices=NECK_TYPES, default=None,
                   help="neck: bn = 3x3 conv + BatchNorm (public v1.x), bias = 3x3 conv with bias (v2.1+) "
                        + (f"(default: {md['neck_type']})" if defaults else inferred))
    p.add_argument("--preprocess", choices=PREPROCESS_PRESETS, default=None,
                   help="input preset: public = bicubic resize, [0, 1] (the paper's code); imagenet = bilinear, "
                        "ImageNet mean/std " + (f"(default: {md['preprocess']})" if defaults else
                                               "(default: the checkpoint's; public for public checkpoints)"))
    if defaults:
        p.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                       help=f"training augmentation: eccv = flip + random occlusion; v2 = QAConv 2.x (pad + crop, "
                            f"rotation, colour jitter, flip, occlusion) (default: {md['augment']})")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local file with ImageNet weights in torchvision or IBN-Net naming (nothing is downloaded)")
    p.add_argument("--neck", type=positive_int, default=None, help=f"neck channels {d('neck')}")
    p.add_argument("--layout", choices=("v2", "eccv"), default=None, help=f"QAConv head layout {d('layout')}")
    p.add_argument("--height", type=positive_int, default=None, help=f"input height {d('height')}")
    p.add_argument("--width", type=positive_int, default=None, help=f"input width {d('width')}")
    p.add_argument("--batch-size", type=positive_int, default=32 if defaults else 64,
                   help="images per batch (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_device(device: Optional[str], command: str = "qaconv") -> str:
    """The requested device, or ``cuda`` when available, else ``cpu``.

    A requested device this machine does not have ends the command (``SystemExit`` with one line).
    """
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"{command}: --device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{command}: --device {device}: CUDA is not available here "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"{command}: --device {device}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"{command}: --device {device}: MPS is not available here; use --device cpu")
    return device


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
                         command: str = "qaconv train") -> List[str]:
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
    p = subparsers.add_parser(
        "train", help="train QAConv (or the GAP baseline) on a dataset",
        description="Train a QAConv model with the class-memory loss (paper recipe by default: SGD, lr 0.01 for "
                    "new layers and 0.001 for a pretrained trunk, x0.1 after 40 epochs, 60 epochs, Random Block). "
                    "A checkpoint is written atomically after every epoch; --resume continues exactly.")
    add_data_args(p)
    add_model_args(p)
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
    add_postprocess_args(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> "TrainConfig":  # noqa: F821
    """A :class:`~qaconv_ext.engine.TrainConfig` from parsed ``train`` arguments (model options not
    given: the defaults, see :func:`settle_model_options`)."""
    from ..engine import TrainConfig

    from ..models import IBN_ARCHITECTURES

    settle_model_options(args)
    if args.ibn not in (None, "none") and args.arch not in IBN_ARCHITECTURES:
        raise SystemExit(f"qaconv train: --ibn {args.ibn}: IBN-Net exists for {', '.join(IBN_ARCHITECTURES)}, "
                         f"not for --arch {args.arch}")
    return TrainConfig(
        method=args.method, arch=args.arch, pretrained=args.pretrained, neck=args.neck, layout=args.layout,
        ibn=None if args.ibn in (None, "none") else args.ibn, neck_type=args.neck_type,
        preprocess=args.preprocess, augment=args.augment,
        height=args.height, width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        base_lr_mult=args.base_lr_mult, step_size=args.step_size, weight_decay=args.weight_decay,
        random_block=not args.no_random_block, flip=not args.no_flip, freeze_bn=args.freeze_bn,
        clip_grad=args.clip_grad, amp=args.amp, workers=args.workers, seed=args.seed,
        device=resolve_device(args.device, "qaconv train"), dataset=args.dataset, data_root=args.data_root or "")


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
        raise SystemExit(f"qaconv train: --resume: {missing_checkpoint_message(target)}")
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CheckpointError as exc:
        raise SystemExit(f"qaconv train: --resume: {exc}") from None
    if "config" not in ckpt and "format" not in ckpt and "model" in ckpt:
        raise SystemExit(f"qaconv train: --resume: {path} was written by the public QAConv code; it can be "
                         f"evaluated (qaconv eval --checkpoint {path}) but not resumed here")
    saved = dict(ckpt.get("config") or {})
    saved.setdefault("preprocess", "imagenet")   # checkpoints from before the presets used ImageNet mean/std
    return {"path": path, "config": saved}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv train``.

    Everything that can fail before the first epoch is checked first: the device, the checkpoint to
    resume and its model options, the training and the test dataset.
    """
    from ..engine import run_training

    resolve_device(args.device, "qaconv train")
    resume = _resume_config(args)
    adopted = settle_model_options(args, resume["config"] if resume else None)
    if adopted:
        print("from the checkpoint: " + " ".join(adopted))
    cfg = config_from_args(args)
    ds = load_dataset(args.dataset, args.data_root, args.combine_all, verbose=True)
    saved_ids = (resume or {}).get("config", {}).get("num_classes")
    if saved_ids is not None and int(saved_ids) != ds.num_train_pids:
        raise SystemExit(f"qaconv train: --resume: the checkpoint was trained on {saved_ids} identities, "
                         f"--dataset {args.dataset} has {ds.num_train_pids}")
    extra: Dict[str, Any] = {"train_root": ds.root}
    test = None
    if args.test_dataset:
        test = load_dataset(args.test_dataset, resolve_test_root(args), verbose=True, option="--test-root")
        extra.update(test_dataset=args.test_dataset, test_root=test.root)
    print("training " + ", ".join(cfg.summary()) + f" on {cfg.device}; {len(ds.train)} images, "
          f"{ds.num_train_pids} identities")
    t0 = time.time()
    trainer = run_training(cfg, ds.train, ds.num_train_pids, checkpoint_dir=args.checkpoint_dir,
                           resume=resume["path"] if resume else None, extra_config=extra,
                           progress=not args.no_progress)
    print(f"trained in {time.time() - t0:.0f} s; checkpoint: {trainer.checkpoint_path}")
    if test is not None:
        from .eval import evaluate_trained, note_postprocessing, print_table

        head = getattr(trainer.criterion, "matcher", None)
        note_postprocessing(head, args.rerank, args.tlift, "qaconv train")
        rows = evaluate_trained(trainer.model, head, cfg.to_dict(), test,
                                device=cfg.device, batch_size=max(64, cfg.batch_size), workers=cfg.workers,
                                rerank=args.rerank, tlift=args.tlift, progress=not args.no_progress)
        print_table(rows, f"{args.dataset} -> {args.test_dataset}")
        out = write_json(os.path.join(args.checkpoint_dir, f"results_{args.test_dataset}.json"), rows)
        print(f"results: {out}")
    return 0
