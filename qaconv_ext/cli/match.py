"""``qaconv match IMAGE_A IMAGE_B``: draw QAConv's local correspondences between two images."""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional

from .common import (PICTURES_DIR, CommandError, add_checkpoint_args, check_writable_folder, load_qaconv, picture_path,
                     resolve_device)

COMMAND = "qaconv match"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``match`` sub-command to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "match", help="draw the local correspondences between two person images",
        description="Match two person images with a trained QAConv model and draw a line between each "
                    "location and its best match in the other image, coloured by its contribution to the score.")
    p.add_argument("image_a", help="first image (the query)")
    p.add_argument("image_b", help="second image")
    add_checkpoint_args(p)
    p.add_argument("-o", "--output", type=picture_path, default=os.path.join(PICTURES_DIR, "correspondences.png"),
                   help="picture to write, .png or .jpg (default: %(default)s)")
    p.add_argument("--direction", choices=("both", "a_to_b", "b_to_a"), default="both",
                   help="which matches to draw (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None,
                   help="draw only matches whose head contribution (or similarity with --no-head) is at least this")
    p.add_argument("--max-lines", type=int, default=50, help="draw at most this many, strongest first "
                   "(default: %(default)s; 0 for none, -1 for all)")
    p.add_argument("--no-head", action="store_true", help="rank lines by raw similarity, not head contribution")
    p.add_argument("--scale", type=float, default=None, help="display zoom factor (default: chosen from the image size)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv match``."""
    import torch

    from ..data import ImageReadError, read_image
    from ..evaluation import extract_features
    from ..viz import draw_correspondences

    device = resolve_device(args.device, COMMAND)
    check_writable_folder(os.path.dirname(os.path.abspath(args.output)), "-o", COMMAND)
    model, head, cfg = load_qaconv(args.checkpoint, device, COMMAND)
    for image in (args.image_a, args.image_b):
        try:
            read_image(image)
        except ImageReadError as exc:
            raise CommandError(f"{COMMAND}: {exc}") from None
    fea = extract_features(model, [args.image_a, args.image_b], cfg["height"], cfg["width"], device=device,
                           progress=False, preprocess=cfg["preprocess"])
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
