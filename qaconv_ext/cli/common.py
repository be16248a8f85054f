"""What the ``qaconv`` sub-commands share: their options and argument types, the one place where
errors become the command's one-line message and exit status, the dataset loader, the device
choice, loading a trained model, the result table and the JSON writer.

Sub-commands import from here and from the library below it, never from one another. Nothing here
imports PyTorch at module level, so that ``qaconv --help`` answers without loading it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..config import ARCHITECTURES, AUGMENTATIONS, NECK_TYPES, PRESETS, RECIPE_DEFAULTS, RECIPES, TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "DATASET_CHOICES", "ARCHITECTURE_CHOICES", "NECK_TYPE_CHOICES", "PREPROCESS_CHOICES", "AUGMENT_CHOICES",
    "RECIPE_CHOICES", "GS_DEFAULTS", "TRAIN_DEFAULTS", "DEFAULT_CHECKPOINT", "PICTURES_DIR", "PICTURE_EXTENSIONS",
    "MAX_PICTURE_RANKS", "check_picture_ranks", "BAD_INPUT", "FAILED", "INTERRUPTED",
    "CommandError", "library_error", "run_command",
    "default_data_root", "default_synthetic_root", "load_dataset", "check_time_stamps",
    "positive_int", "non_negative_int", "positive_float", "non_negative_float", "output_file", "picture_path",
    "json_path", "check_writable_folder",
    "add_data_args", "add_model_args", "add_postprocess_args", "add_rerank_mode_arg", "add_dataset_command",
    "add_checkpoint_args", "default_checkpoint", "resolve_device", "load_model_or_exit", "load_qaconv", "evaluate_or_exit",
    "note_postprocessing", "FEW_QUERIES", "count_queries_or_exit", "describe_counts", "with_counts", "print_table", "write_json", "json_ready", "error_line", "image_record",
]

DATASET_CHOICES = ("market1501", "dukemtmcreid", "msmt17", "synthetic-a", "synthetic-b", "folder")

#: The choices of the model options and the training defaults the help texts name, from the
#: torch-free :mod:`qaconv_ext.config` (the parsers are built without importing PyTorch).
ARCHITECTURE_CHOICES = ARCHITECTURES
NECK_TYPE_CHOICES = NECK_TYPES
PREPROCESS_CHOICES = PRESETS
AUGMENT_CHOICES = AUGMENTATIONS
RECIPE_CHOICES = RECIPES
GS_DEFAULTS: Dict[str, Any] = RECIPE_DEFAULTS["gs"]
TRAIN_DEFAULTS: Dict[str, Any] = dataclasses.asdict(TrainConfig())

#: The QAConv model the picture commands (``match``, ``rank``) read unless told otherwise: ``qaconv demo``'s,
#: in the current folder or the nearest folder above it that holds one (:func:`default_checkpoint`).
DEFAULT_CHECKPOINT = os.path.join("runs", "demo", "qaconv.pt")

#: Where the picture commands write unless told otherwise.
PICTURES_DIR = os.path.join("runs", "pictures")

#: The most gallery images one ranked-list picture shows (``rank -k``, ``search -k`` with ``-o``): beyond it
#: the picture grows past what a screen or an image viewer handles (about 100 px a column).
MAX_PICTURE_RANKS = 100

#: The picture formats ``-o`` accepts.
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg")

#: Exit status of a command refused because of its input (found before the work starts).
BAD_INPUT = 2
#: Exit status of a command that failed during the work (e.g. a training run that diverged).
FAILED = 1
#: Exit status of a command interrupted by Ctrl-C (SIGINT), as a shell reports it.
INTERRUPTED = 130


# ----------------------------------------------------------------------------------------------
# Errors: one line and an exit status
# ----------------------------------------------------------------------------------------------

class CommandError(SystemExit):
    """Ends a sub-command: ``str(error)`` is the one-line message, ``code`` the exit status
    (:data:`BAD_INPUT` or :data:`FAILED`)."""

    def __init__(self, message: str, code: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return str(self.args[0])


def library_error(exc: BaseException, command: str) -> Optional[CommandError]:
    """The :class:`CommandError` for an error of the library that tells the user what is wrong with
    their input or run (``TrainingDiverged``, ``PretrainedWeightsError``, ``CheckpointError``,
    ``DatasetFormatError``, ``ImageReadError``), else None. ``command``: e.g. ``"qaconv train"``."""
    from ..data import DatasetFormatError, ImageReadError
    from ..engine import CheckpointError, TrainingDiverged
    from ..models import PretrainedWeightsError

    if isinstance(exc, TrainingDiverged):
        return CommandError(f"{command}: {exc}", FAILED)
    if isinstance(exc, ImageReadError):
        hint = ("; --skip-bad-images leaves unreadable images out" if command in ("qaconv train", "qaconv eval")
                else "")
        return CommandError(f"{command}: {exc}{hint}", BAD_INPUT)
    if isinstance(exc, (PretrainedWeightsError, CheckpointError, DatasetFormatError)):
        return CommandError(f"{command}: {exc}", BAD_INPUT)
    return None


def run_command(func: Callable[[argparse.Namespace], Optional[int]], args: argparse.Namespace,
                command: str) -> int:
    """Run a sub-command's ``func(args)``; returns its exit status.

    A :class:`CommandError`, a ``SystemExit`` with a message (status :data:`BAD_INPUT`) or an error of
    the library that :func:`library_error` knows is printed as one line on stderr and raised again as
    a :class:`CommandError` (so the process exits with its status; callers in Python can catch it).
    Other exceptions propagate unchanged (a traceback means a bug).
    """
    try:
        rc = func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except CommandError as exc:
        error = exc
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        error = CommandError(exc.code, BAD_INPUT)
    except Exception as exc:  # noqa: BLE001 - only the library's known errors are turned into one line
        known = library_error(exc, command)
        if known is None:
            raise
        error = known
    else:
        return int(rc or 0)
    print(error, file=sys.stderr)
    raise error


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
                 option: str = "--data-root", *, splits: Sequence[str] = ("train", "query", "gallery"),
                 skip_bad_images: bool = False, command: str = "qaconv") -> Any:
    """Load the ``splits`` of ``name`` (one of :data:`DATASET_CHOICES`) from ``root``.

    ``synthetic-a``/``synthetic-b`` are the two domains of the built-in camera network under ``root``
    (default :func:`default_synthetic_root`), generated on first use. Real datasets read ``root``
    (default ``$QACONV_DATA``), which may be the dataset folder or the folder that contains it; only
    the folders of ``splits`` need to exist. ``skip_bad_images``: decode every image once and leave
    out those that cannot be read (they are counted and the first named). ``option`` is the
    command-line option that gives ``root`` and ``command`` the command (for the error messages).
    """
    from ..data import Market1501, build_dataset, make_synthetic_network

    name = name.lower()
    kwargs: Dict[str, Any] = {"splits": tuple(splits), "skip_bad_images": bool(skip_bad_images)}
    if name in ("synthetic-a", "synthetic-b"):
        root = root or default_synthetic_root()
        paths = make_synthetic_network(root, progress=verbose)
        folder = paths["domain_a" if name.endswith("a") else "domain_b"]
        try:
            ds = Market1501(folder, **kwargs)
        except (OSError, ValueError) as exc:
            raise CommandError(f"{command}: cannot read {name} from {folder}: {exc}") from None
    else:
        root = root or default_data_root()
        if not root:
            raise CommandError(f"{command}: {option} is required for {name} (or set $QACONV_DATA)")
        if name == "msmt17" and combine_all:
            kwargs["combine_all"] = True
        try:
            ds = build_dataset(name, root, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise CommandError(f"{command}: cannot read {name} from {root}: {exc}") from None
    if verbose:
        print(ds.summary())
    if ds.skipped_images:
        shown = "; ".join(f"{reason}" for _, reason in ds.skipped_images[:3])
        more = ", ..." if len(ds.skipped_images) > 3 else ""
        print(f"{command}: skipped {len(ds.skipped_images)} unreadable image(s) of {name}: {shown}{more}")
    return ds


def check_time_stamps(dataset: Any, name: str, command: str, option: str = "--tlift") -> None:
    """Refuse ``option`` (TLift) for a dataset whose query or gallery images lack time stamps."""
    records = list(dataset.query) + list(dataset.gallery)
    missing = sum(1 for r in records if r.time is None)
    if missing:
        raise CommandError(f"{command}: {option}: {name} has no time stamps on {missing} of its {len(records)} "
                           "query/gallery images, and TLift needs them (MSMT17 and folder datasets have none); "
                           f"drop {option} (--rerank still gives the re-ranking row)")


# ----------------------------------------------------------------------------------------------
# Argument types
# ----------------------------------------------------------------------------------------------

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _bounded(parse: Callable[[str], Any], bound: float, *, strict: bool, rule: str, name: str,
             doc: str) -> Callable[[str], Any]:
    """An ``argparse`` type: ``parse(text)``, refused below ``bound`` (and at it when ``strict``) with
    ``"must be <rule>, got <value>"``."""
    def check(text: str) -> Any:
        value = parse(text)
        if value < bound or (strict and value == bound):
            shown = value if isinstance(value, int) else text
            raise argparse.ArgumentTypeError(f"must be {rule}, got {shown}")
        return value

    check.__name__ = check.__qualname__ = name
    check.__doc__ = doc
    return check


positive_int = _bounded(_int, 1, strict=False, rule="at least 1", name="positive_int",
                        doc="``argparse`` type: an integer >= 1.")
non_negative_int = _bounded(_int, 0, strict=False, rule="0 or more", name="non_negative_int",
                            doc="``argparse`` type: an integer >= 0.")
positive_float = _bounded(_float, 0.0, strict=True, rule="greater than 0", name="positive_float",
                          doc="``argparse`` type: a finite number > 0 (``nan``, ``inf`` and negative numbers "
                              "are refused).")
non_negative_float = _bounded(_float, 0.0, strict=False, rule="0 or more", name="non_negative_float",
                              doc="``argparse`` type: a finite number >= 0.")


def output_file(extensions: Sequence[str], what: str) -> Callable[[str], str]:
    """``argparse`` type: a file name ending in one of ``extensions`` (case-insensitive); ``what``
    names the kind of file in the error."""
    exts = tuple(e.lower() for e in extensions)
    listed = ", ".join(exts[:-1]) + (" or " if len(exts) > 1 else "") + exts[-1]

    def check(text: str) -> str:
        if not text.lower().endswith(exts) or os.path.basename(text) in exts:
            raise argparse.ArgumentTypeError(f"{text!r}: {what} is written here; give a file name ending in {listed}")
        return text

    check.__name__ = f"{what} file"
    return check


#: ``argparse`` type of a picture to write (``-o`` of ``match``/``rank``).
picture_path = output_file(PICTURE_EXTENSIONS, "a PNG or JPEG picture")
#: ``argparse`` type of a JSON file to write (``--json``).
json_path = output_file((".json",), "JSON")


def check_writable_folder(path: str, option: str, command: str) -> None:
    """Refuse a folder ``path`` (given by ``option``) that cannot be created or written, before any
    work starts. Nothing is created: the nearest existing folder on the path is tried with a
    temporary file that leaves no trace."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise CommandError(f"{command}: {option} {path}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        where = "" if probe == path else f" (in {probe})"
        raise CommandError(f"{command}: {option} {path}: cannot write there{where}: "
                           f"{exc.strerror or exc}") from None


def check_picture_ranks(k: int, command: str, advice: str = "") -> None:
    """Refuse to draw more than :data:`MAX_PICTURE_RANKS` ranked gallery images in one picture."""
    if k > MAX_PICTURE_RANKS:
        raise CommandError(f"{command}: -k {k}: one ranked-list picture shows at most {MAX_PICTURE_RANKS} gallery "
                           f"images; give -k {MAX_PICTURE_RANKS} or less{advice}")


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--dataset``, ``--data-root``, ``--combine-all``, ``--skip-bad-images``."""
    p.add_argument("--dataset", choices=DATASET_CHOICES, required=required,
                   help="dataset to use (synthetic-a/-b: the built-in camera network, generated on first use)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder or the folder containing it (default: $QACONV_DATA; synthetic: "
                        "$QACONV_DATA/synthetic or data_cache/synthetic)")
    p.add_argument("--combine-all", action="store_true", help="MSMT17: train on all 4,101 identities")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image once before starting and leave out (and count) those that cannot "
                        "be read; without it an unreadable image ends the command with its path")


def add_postprocess_args(p: argparse.ArgumentParser) -> None:
    """``--rerank``, ``--tlift``."""
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    p.add_argument("--tlift", action="store_true",
                   help="also report re-ranking + TLift (needs time stamps: refused for datasets without them)")


def add_rerank_mode_arg(p: argparse.ArgumentParser) -> None:
    """``--rerank-mode dense|sparse``: how re-ranking gets the gallery-gallery scores."""
    p.add_argument("--rerank-mode", choices=("dense", "sparse"), default="dense",
                   help="dense: build the gallery x gallery score matrix (fast, 4 G^2 bytes); sparse: stream its "
                        "rows from the fused op in blocks, never holding it (for large galleries, e.g. MSMT17) "
                        "(default: %(default)s)")


def add_model_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--arch``, ``--ibn``, ``--neck-type``, ``--preprocess`` (``--augment`` for training), ``--pretrained``,
    ``--neck``, ``--layout``, ``--height``, ``--width``, ``--batch-size``, ``--device``, ``--workers``,
    ``--no-progress``.

    With ``defaults`` (``train``) every option but ``--device`` parses to None when not given: a new
    run then takes the training default (named in the help), a resumed run the checkpoint's value.
    Without (``eval``) the model options parse to None and come from the checkpoint; the batch size
    and the workers have plain defaults.
    """
    td = TRAIN_DEFAULTS
    d = (lambda k: f"(default: {td[k]})") if defaults else (lambda k: "(default: from the checkpoint)")  # noqa: E731
    inferred = "(default: {})".format("none" if defaults else "inferred from the checkpoint's weights")
    p.add_argument("--arch", choices=ARCHITECTURE_CHOICES, default=None, help=f"backbone {d('arch')}")
    p.add_argument("--ibn", choices=("a", "b", "none"), default=None,
                   help=f"IBN-Net variant of a ResNet-18/34/50/101 trunk (QAConv 2.x uses b) {inferred}")
    p.add_argument("--neck-type", choices=NECK_TYPE_CHOICES, default=None,
                   help="neck: bn = 3x3 conv + BatchNorm (public v1.x), bias = 3x3 conv with bias (v2.1+) "
                        + (f"(default: {td['neck_type']})" if defaults else inferred))
    p.add_argument("--preprocess", choices=PREPROCESS_CHOICES, default=None,
                   help="input preset: public = bicubic resize, [0, 1] (the paper's code); imagenet = bilinear, "
                        "ImageNet mean/std " + (f"(default: {td['preprocess']})" if defaults else
                                               "(default: the checkpoint's; public for public checkpoints)"))
    if defaults:
        p.add_argument("--augment", choices=AUGMENT_CHOICES, default=None,
                       help=f"training augmentation: eccv = flip + random occlusion; v2 = QAConv 2.x (pad + crop, "
                            f"rotation, colour jitter, flip, occlusion) (default: {td['augment']}; "
                            f"{GS_DEFAULTS['augment']} with --recipe gs)")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="local file with ImageNet weights in torchvision or IBN-Net naming (nothing is downloaded)")
    p.add_argument("--neck", type=positive_int, default=None, help=f"neck channels {d('neck')}")
    p.add_argument("--layout", choices=("v2", "eccv"), default=None, help=f"QAConv head layout {d('layout')}")
    p.add_argument("--height", type=positive_int, default=None, help=f"input height {d('height')}")
    p.add_argument("--width", type=positive_int, default=None, help=f"input width {d('width')}")
    if defaults:
        p.add_argument("--batch-size", type=positive_int, default=None,
                       help=f"images per batch (default: {TRAIN_DEFAULTS['batch_size']}; "
                            f"{GS_DEFAULTS['batch_size']} with --recipe gs)")
        p.add_argument("--workers", type=non_negative_int, default=None,
                       help=f"data-loading processes, 0 to load in this process (default: {TRAIN_DEFAULTS['workers']})")
    else:
        p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: %(default)s)")
        p.add_argument("--workers", type=non_negative_int, default=2,
                       help="data-loading processes, 0 to load in this process (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_dataset_command(subparsers: Any, name: str, help: str, description: str, *, defaults: bool = True,
                        dataset_required: bool = True) -> argparse.ArgumentParser:
    """The parser of a sub-command that reads a dataset with a model (``train``, ``eval``): ``name``
    with the data options (:func:`add_data_args`, ``--dataset`` required unless ``dataset_required``
    is False) and the model options (:func:`add_model_args`, ``defaults`` as there)."""
    p = subparsers.add_parser(name, help=help, description=description)
    add_data_args(p, required=dataset_required)
    add_model_args(p, defaults=defaults)
    return p


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--device``, shared by the picture commands."""
    parser.add_argument("--checkpoint", default=None,
                        help=f"trained model: a checkpoint file or a run folder holding checkpoint.pt "
                             f"(default: {DEFAULT_CHECKPOINT}, written by `qaconv demo`, in this folder or the "
                             "nearest one above it that has it)")
    parser.add_argument("--device", default="cpu", help="torch device for the features (default: cpu)")


# ----------------------------------------------------------------------------------------------
# Device and models
# ----------------------------------------------------------------------------------------------

def resolve_device(device: Optional[str], command: str = "qaconv") -> str:
    """The requested device, or ``cuda`` when available, else ``cpu``.

    A requested device this machine does not have ends the command (one line, :data:`BAD_INPUT`).
    """
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CommandError(f"{command}: --device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"{command}: --device {device}: CUDA is not available here "
                               f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CommandError(f"{command}: --device {device}: this machine has {torch.cuda.device_count()} "
                               "CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"{command}: --device {device}: MPS is not available here; use --device cpu")
    return device


def _non_finite_weights(backbone: "nn.Module", head: Optional["nn.Module"]) -> List[str]:
    """Names (``backbone.*``, ``head.*``) of the floating-point parameters and buffers that hold a NaN or Inf."""
    import torch

    bad = []
    for prefix, module in (("backbone", backbone), ("head", head)):
        if module is None:
            continue
        for name, t in module.state_dict().items():
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad.append(f"{prefix}.{name}")
    return bad


def load_model_or_exit(path: str, command: str, **kwargs: Any
                       ) -> Tuple["nn.Module", Optional["nn.Module"], Dict[str, Any]]:
    """:func:`qaconv_ext.engine.load_trained` (``kwargs``: its ``arch``, ``neck``, ``height``,
    ``width``, ``layout``, ``device``), with its errors as the command's exit message. A model with
    NaN or infinite weights is refused too."""
    from ..engine import CheckpointError, load_trained

    try:
        backbone, head, cfg = load_trained(path, **kwargs)
    except CheckpointError as exc:
        raise CommandError(f"{command}: {exc}") from None
    bad = _non_finite_weights(backbone, head)
    if bad:
        more = ", ..." if len(bad) > 3 else ""
        raise CommandError(f"{command}: {cfg['checkpoint']}: {len(bad)} weight tensor(s) are not finite (NaN or Inf): "
                           f"{', '.join(bad[:3])}{more}; this model cannot score images")
    return backbone, head, cfg


def default_checkpoint(start: Optional[str] = None) -> Optional[str]:
    """:data:`DEFAULT_CHECKPOINT` in ``start`` (default: the current folder) or the nearest folder above
    it that holds one (so the picture commands find the demo's model from anywhere inside the folder
    ``qaconv demo`` ran in), else None."""
    folder = os.path.abspath(start or os.getcwd())
    while True:
        path = os.path.join(folder, DEFAULT_CHECKPOINT)
        if os.path.isfile(path):
            return path
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def load_qaconv(path: Optional[str], device: str = "cpu", command: str = "qaconv"
                ) -> Tuple["nn.Module", "nn.Module", Dict[str, Any]]:
    """A trained QAConv model for the picture commands, or :class:`CommandError` saying what to do.

    See :func:`qaconv_ext.engine.load_trained`; ``path`` None is :func:`default_checkpoint` (when there is
    none the message asks the user to run ``qaconv demo``), a folder without ``checkpoint.pt`` names the
    ``*.pt`` files it holds, and a baseline checkpoint (no QAConv head) is refused.
    """
    from ..engine import find_checkpoint
    from ..engine.checkpoint import missing_checkpoint_message

    if path is None:
        path = default_checkpoint()
        if path is None:
            raise CommandError(f"{command}: no {DEFAULT_CHECKPOINT} in {os.getcwd()} or a folder above it; run "
                               "`qaconv demo` first (it trains a model on the built-in synthetic data and saves it "
                               "there), or give --checkpoint")
    if find_checkpoint(path) is None:
        if os.path.isdir(path):
            raise CommandError(f"{command}: {missing_checkpoint_message(path)}")
        raise CommandError(f"{command}: checkpoint not found: {path}; pass an existing file with --checkpoint, or "
                           f"run `qaconv demo` to create {DEFAULT_CHECKPOINT}")
    backbone, head, cfg = load_model_or_exit(path, command, device=device)
    if head is None:
        raise CommandError(f"{command}: {path} is a baseline checkpoint (no QAConv head); give a QAConv model")
    return backbone, head, cfg


def evaluate_or_exit(command: str, *args: Any, evaluate: Optional[Callable[..., Any]] = None,
                     **kwargs: Any) -> Any:
    """``evaluate(*args, **kwargs)`` (default :func:`qaconv_ext.evaluation.evaluate_trained`); scores or
    distances that are not finite (which the metrics refuse) end the command with one line and status
    :data:`FAILED`."""
    if evaluate is None:
        from ..evaluation import evaluate_trained as evaluate

    try:
        return evaluate(*args, **kwargs)
    except ValueError as exc:
        if "not finite (NaN or Inf)" not in str(exc):
            raise
        raise CommandError(f"{command}: the model's scores are not finite, so nothing can be ranked: {exc}",
                           FAILED) from None


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def note_postprocessing(head: Optional["nn.Module"], rerank: bool, tlift: bool, command: str) -> None:
    """Say so when ``--rerank``/``--tlift`` are asked of a baseline model (they apply to QAConv scores)."""
    if head is None and (rerank or tlift):
        opts = "/".join(o for o, on in (("--rerank", rerank), ("--tlift", tlift)) if on)
        print(f"{command}: note: {opts} apply to QAConv checkpoints; this is a baseline, so only its row is reported")


#: Below this many queries with a true match, a metrics table says that its percentages say little.
FEW_QUERIES = 20


def count_queries_or_exit(dataset: Any, name: str, command: str) -> Dict[str, int]:
    """:func:`qaconv_ext.evaluation.query_counts` of ``dataset``'s query and gallery sets, read from the
    records before any work; a dataset where no query has a true match ends the command (one line,
    :data:`BAD_INPUT`): its metrics would divide by zero."""
    from ..evaluation import query_counts

    counts = query_counts(dataset.query, dataset.gallery)
    if counts["queries_with_true_match"] == 0:
        raise CommandError(f"{command}: no query of {name} has a true match in its gallery (an image of the same "
                           f"identity from another camera): {len(dataset.query)} queries, {len(dataset.gallery)} "
                           "gallery images; there is nothing to evaluate")
    return counts


def describe_counts(counts: Dict[str, int]) -> str:
    """The line under a metrics table that says what it counts (and when that is too few to mean much)."""
    n, m = counts["queries"], counts["queries_with_true_match"]
    text = (f"{n} quer{'y' if n == 1 else 'ies'} evaluated, {m} with a true match in the gallery "
            f"(the metrics average over those {m})")
    if m < FEW_QUERIES:
        text += (f"; only {m}: each moves Rank-1 by {100 / m:.1f} points, so these numbers say little")
    return text


def with_counts(rows: Dict[str, Dict[str, Any]], counts: Dict[str, int]) -> Dict[str, Dict[str, Any]]:
    """``rows`` with ``queries`` and ``queries_with_true_match`` in every row (the result JSON files)."""
    return {name: {**m, **counts} for name, m in rows.items()}


def print_table(rows: Dict[str, Dict[str, float]], title: str = "", counts: Optional[Dict[str, int]] = None) -> str:
    """Print (and return) a table of Rank-1/5/10, mAP, mINP in percent; ``counts``
    (:func:`count_queries_or_exit`) adds the line that says how many queries it counts."""
    from ..evaluation import format_metrics

    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'method':<26}{'Rank-1':>8}{'Rank-5':>8}{'Rank-10':>8}{'mAP':>8}{'mINP':>8}")
    lines.append("-" * 66)
    lines += [format_metrics(name, m, width=26) for name, m in rows.items()]
    if counts is not None:
        lines.append(describe_counts(counts))
    text = "\n".join(lines)
    print(text)
    return text


def json_ready(obj: Any) -> Any:
    """``obj`` with every float that is NaN or infinite replaced by None (JSON has no such numbers:
    they are written as ``null``), through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as indented, valid JSON to ``path`` (creating its folder); returns ``path``. A number
    that is NaN or infinite is written as ``null`` (:func:`json_ready`); nothing else non-standard is
    accepted (``allow_nan=False``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(json_ready(obj), fh, indent=2, allow_nan=False)
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
