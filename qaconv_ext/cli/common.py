"""What the ``qaconv`` sub-commands share: their options, the dataset loader, the device choice,
loading a trained model (errors become the command's exit message), the result table and the JSON
writer.

Sub-commands import from here and from the library below it, never from one another.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Dict, Optional, Tuple

from torch import nn

__all__ = [
    "DATASET_CHOICES", "MODEL_OPTIONS", "DEFAULT_CHECKPOINT",
    "default_data_root", "default_synthetic_root", "load_dataset",
    "positive_int", "add_data_args", "add_model_args", "add_postprocess_args", "add_rerank_mode_arg",
    "add_dataset_command",
    "add_checkpoint_args", "model_defaults",
    "resolve_device", "load_model_or_exit", "load_qaconv", "note_postprocessing", "print_table", "write_json",
    "error_line", "image_record",
]

DATASET_CHOICES = ("market1501", "dukemtmcreid", "msmt17", "synthetic-a", "synthetic-b", "folder")

#: The options that define the model's shapes; a resumed run takes them from the checkpoint.
MODEL_OPTIONS = ("method", "arch", "neck", "layout", "height", "width", "ibn", "neck_type", "preprocess", "augment")

#: The QAConv model the picture commands (``match``, ``rank``) read unless told otherwise.
DEFAULT_CHECKPOINT = os.path.join("runs", "demo", "qaconv.pt")


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def add_rerank_mode_arg(p: argparse.ArgumentParser) -> None:
    """``--rerank-mode dense|sparse``: how re-ranking gets the gallery-gallery scores."""
    p.add_argument("--rerank-mode", choices=("dense", "sparse"), default="dense",
                   help="dense: build the gallery x gallery score matrix (fast, 4 G^2 bytes); sparse: stream its "
                        "rows from the fused op in blocks, never holding it (for large galleries, e.g. MSMT17) "
                        "(default: %(default)s)")


def model_defaults() -> Dict[str, Any]:
    """The :data:`MODEL_OPTIONS` of a fresh :class:`~qaconv_ext.engine.TrainConfig`."""
    from ..engine.config import TrainConfig

    cfg = TrainConfig()
    return {k: getattr(cfg, k) for k in MODEL_OPTIONS}


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


def add_dataset_command(subparsers: Any, name: str, help: str, description: str, *, defaults: bool = True
                        ) -> argparse.ArgumentParser:
    """The parser of a sub-command that reads a dataset with a model (``train``, ``eval``): ``name``
    with the data options (:func:`add_data_args`) and the model options (:func:`add_model_args`,
    ``defaults`` as there)."""
    p = subparsers.add_parser(name, help=help, description=description)
    add_data_args(p)
    add_model_args(p, defaults=defaults)
    return p


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--device``, shared by the picture commands."""
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"trained model (default: {DEFAULT_CHECKPOINT}, written by `qaconv demo`)")
    parser.add_argument("--device", default="cpu", help="torch device for the features (default: cpu)")


# ----------------------------------------------------------------------------------------------
# Device and models
# ----------------------------------------------------------------------------------------------

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


def load_model_or_exit(path: str, command: str, **kwargs: Any
                       ) -> Tuple[nn.Module, Optional[nn.Module], Dict[str, Any]]:
    """:func:`qaconv_ext.engine.load_trained` (``kwargs``: its ``arch``, ``neck``, ``height``,
    ``width``, ``layout``, ``device``), with its errors as the command's exit message."""
    from ..engine import CheckpointError, load_trained

    try:
        return load_trained(path, **kwargs)
    except CheckpointError as exc:
        raise SystemExit(f"{command}: {exc}") from None


def load_qaconv(path: str, device: str = "cpu", command: str = "qaconv"
                ) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """A trained QAConv model for the picture commands, or ``SystemExit`` with a message saying what to do.

    See :func:`qaconv_ext.engine.load_trained`; a missing default checkpoint asks the user to run
    ``qaconv demo``, a folder without ``checkpoint.pt`` names the ``*.pt`` files it holds, and a
    baseline checkpoint (no QAConv head) is refused.
    """
    from ..engine import find_checkpoint
    from ..engine.checkpoint import missing_checkpoint_message

    if find_checkpoint(path) is None:
        if os.path.isdir(path):
            raise SystemExit(f"{command}: {missing_checkpoint_message(path)}")
        hint = ("run `qaconv demo` first (it trains a model on the built-in synthetic data and saves it there)"
                if os.path.normpath(path) == os.path.normpath(DEFAULT_CHECKPOINT) else
                f"pass an existing file with --checkpoint, or run `qaconv demo` to create {DEFAULT_CHECKPOINT}")
        raise SystemExit(f"{command}: checkpoint not found: {path}; {hint}")
    backbone, head, cfg = load_model_or_exit(path, command, device=device)
    if head is None:
        raise SystemExit(f"{command}: {path} is a baseline checkpoint (no QAConv head); give a QAConv model")
    return backbone, head, cfg


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def note_postprocessing(head: Optional[nn.Module], rerank: bool, tlift: bool, command: str) -> None:
    """Say so when ``--rerank``/``--tlift`` are asked of a baseline model (they apply to QAConv scores)."""
    if head is None and (rerank or tlift):
        opts = "/".join(o for o, on in (("--rerank", rerank), ("--tlift", tlift)) if on)
        print(f"{command}: note: {opts} apply to QAConv checkpoints; this is a baseline, so only its row is reported")


def print_table(rows: Dict[str, Dict[str, float]], title: str = "") -> str:
    """Print (and return) a table of Rank-1/5/10, mAP, mINP in percent."""
    from ..evaluation import format_metrics

    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'method':<26}{'Rank-1':>8}{'Rank-5':>8}{'Rank-10':>8}{'mAP':>8}{'mINP':>8}")
    lines.append("-" * 66)
    lines += [format_metrics(name, m, width=26) for name, m in rows.items()]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as indented JSON to ``path`` (creating its folder); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
    return path


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line (for an error re-raised from a data-loading worker, which
    carries the worker's traceback: its last line, without the exception's name)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1:
        return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
    return lines[0] if lines else type(exc).__name__


#: Identity and camera in Market-1501 / DukeMTMC-reID style file names (``0002_c3s1_000451_01.jpg``).
_NAME_RE = re.compile(r"(?P<pid>-?\d+)_c(?P<cam>\d+)")


def image_record(path: str) -> Any:
    """A :class:`~qaconv_ext.data.Record` of an image file: absolute path; identity and 0-based camera read
    from names like ``0002_c3s1_000451_01.jpg``, else unknown (-1); no time."""
    from ..data import Record

    m = _NAME_RE.match(os.path.splitext(os.path.basename(path))[0])
    pid, cam = (int(m.group("pid")), int(m.group("cam")) - 1) if m else (-1, -1)
    return Record(os.path.abspath(path), pid, cam, None)
