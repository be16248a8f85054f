"""``qaconv match IMAGE_A IMAGE_B``: draw QAConv's local correspondences between two images.

Also home of :func:`load_qaconv`, which the picture commands (``match`` and ``rank``) use to turn a
checkpoint into ``(backbone, head, config)``.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Tuple

import torch

from .train import resolve_device

DEFAULT_CHECKPOINT = os.path.join("runs", "demo", "qaconv.pt")


def load_qaconv(path: str, device: str = "cpu", command: str = "qaconv"
                ) -> Tuple[torch.nn.Module, torch.nn.Module, Dict[str, Any]]:
    """A trained QAConv model for the picture commands, or ``SystemExit`` with a message saying what to do.

    See :func:`qaconv_ext.engine.load_trained`; a missing default checkpoint asks the user to run
    ``qaconv demo``, a folder without ``checkpoint.pt`` names the ``*.pt`` files it holds, and a
    baseline checkpoint (no QAConv head) is refused.
    """
    from ..engine import CheckpointError, find_checkpoint, load_trained
    from ..engine.checkpoint import missing_checkpoint_message

    if find_checkpoint(path) is None:
        if os.path.isdir(path):
            raise SystemExit(f"{command}: {missing_checkpoint_message(path)}")
        hint = ("run `qaconv demo` first (it trains a model on the built-in synthetic data and saves it there)"
                if os.path.normpath(path) == os.path.normpath(DEFAULT_CHECKPOINT) else
                f"pass an existing file with --checkpoint, or run `qaconv demo` to create {DEFAULT_CHECKPOINT}")
        raise SystemExit(f"{command}: checkpoint not found: {path}; {hint}")
    try:
        backbone, head, cfg = load_trained(path, device=device)
    except CheckpointError as exc:
        raise SystemExit(f"{command}: {exc}") from None
    if head is None:
        raise SystemExit(f"{command}: {path} is a baseline checkpoint (no QAConv head); give a QAConv model")
    return backbone, head, cfg


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` and ``--device``, shared by the picture commands."""
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"trained model (default: {DEFAULT_CHECKPOINT}, written by `qaconv demo`)")
    parser.add_argument("--device", default="cpu", help="torch device for the features (default: cpu)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``match`` sub-command to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "match", help="draw the local correspondences between two person images",
        description="Match two person images with a trained QAConv model and draw a line between each "
                    "location and its best match in the other image, coloured by its contribution to the score.")
    p.add_argument("image_a", help="first image (the query)")
    p.add_argument("image_b", help="second image")
    add_checkpoint_args(p)
    p.add_argument("-o", "--output", default="correspondences.png", help="picture to write (default: %(default)s)")
    p.add_argument("--direction", choices=("both", "a_to_b", "b_to_a"), default="both",
                   help="which matches to draw (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None,
                   help="draw only matches whose head contribution (or similarity with --no-head) is at least this")
    p.add_argument("--max-lines", type=int, default=50, help="draw at most this many, strongest first "
                   "(default: %(default)s; 0 for none, -1 for all)")
    p.add_argument("--no-head", action="store_true", help="rank lines by raw similarity, not head contribution")
    p.add_argument("--scale", type=float, default=None, help="display zoom (default: auto)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv match``."""
    from ..evaluation import extract_features
    from ..viz import draw_correspondences

    device = resolve_device(args.device, "qaconv match")
    model, head, cfg = load_qaconv(args.checkpoint, device, "qaconv match")
    try:
        fea = extract_features(model, [args.image_a, args.image_b], cfg["height"], cfg["width"], device=device,
                               progress=False)
    except OSError as exc:
        raise SystemExit(f"qaconv match: {exc}") from None
    max_lines: Optional[int] = None if args.max_lines is not None and args.max_lines < 0 else args.max_lines
    img, segs = draw_correspondences(args.image_a, args.image_b, fea[0], fea[1],
                                     head=None if args.no_head else head, direction=args.direction,
                                     threshold=args.threshold, max_lines=max_lines,
                                     image_size=(cfg["height"], cfg["width"]), scale=args.scale,
                                     return_segments=True)
    with torch.no_grad():
        logit = float(head.eval()(fea[:1], fea[1:]).reshape(-1)[0])
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    img.save(args.output)
    print(f"QAConv score (logit) {logit:.3f}, sigmoid {torch.sigmoid(torch.tensor(logit)).item():.3f}; "
          f"{len(segs)} lines drawn -> {args.output}")
    return 0
