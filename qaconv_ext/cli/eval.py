"""``qaconv eval``: evaluate a trained model (this package's or a public QAConv checkpoint) on a dataset."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Tuple

from torch import nn

from .output import write_json
from .train import DATASET_CHOICES, add_data_args, add_model_args, add_postprocess_args, load_dataset, resolve_device

ROW_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def load_trained(path: str, arch: Optional[str] = None, neck: Optional[int] = None, height: Optional[int] = None,
                 width: Optional[int] = None, layout: Optional[str] = None, **overrides: Any
                 ) -> Tuple[nn.Module, Optional[nn.Module], Dict[str, Any]]:
    """:func:`qaconv_ext.engine.load_trained` (``overrides``: ``ibn``, ``neck_type``, ``preprocess``), with
    its errors as the command's exit message."""
    from ..engine import CheckpointError
    from ..engine import load_trained as load

    try:
        return load(path, arch=arch, neck=neck, height=height, width=width, layout=layout, **overrides)
    except CheckpointError as exc:
        raise SystemExit(f"qaconv eval: {exc}") from None


def evaluate_trained(backbone: nn.Module, head: Optional[nn.Module], cfg: Dict[str, Any], dataset: Any, *,
                     device: str = "cpu", batch_size: int = 64, workers: int = 0, rerank: bool = False,
                     tlift: bool = False, progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Rows ``{name: {rank1, rank5, rank10, mAP, mINP}}`` for a QAConv model (head given) or a baseline."""
    from ..evaluation import BASELINE_ROW, evaluate_baseline, evaluate_qaconv

    h, w = int(cfg["height"]), int(cfg["width"])
    if head is None:
        res = {BASELINE_ROW: evaluate_baseline(backbone, dataset.query, dataset.gallery, h, w,
                                                            batch_size=batch_size, device=device, workers=workers,
                                                            progress=progress)}
    else:
        res = evaluate_qaconv(backbone, head, dataset.query, dataset.gallery, h, w, batch_size=batch_size,
                              device=device, workers=workers, rerank=rerank, tlift=tlift, progress=progress)
        res.pop("_scores", None)
    return {name: {k: float(m[k]) for k in ROW_KEYS} for name, m in res.items()}


def note_postprocessing(head: Optional[nn.Module], rerank: bool, tlift: bool, command: str = "qaconv eval") -> None:
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


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command."""
    p = subparsers.add_parser(
        "eval", help="evaluate a trained model on a dataset",
        description="Extract features, score the query set against the gallery with the fused QAConv op and report "
                    "Rank-1/5/10, mAP and mINP (Market-1501 protocol). Reads this package's checkpoints and those "
                    "of the public QAConv code (any version; the backbone is inferred from the weights; give --height and "
                    "--width for public models trained at another size than 384 x 128).")
    add_data_args(p)
    add_model_args(p, defaults=False)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (or a folder holding checkpoint.pt or the public code's checkpoint.pth.tar)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="folder holding checkpoint.pt or checkpoint.pth.tar (alternative to --checkpoint)")
    add_postprocess_args(p)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv eval``."""
    path = args.checkpoint or args.checkpoint_dir
    if not path:
        raise SystemExit("qaconv eval: give --checkpoint FILE or --checkpoint-dir DIR")
    device = resolve_device(args.device, "qaconv eval")
    if args.pretrained:
        print("qaconv eval: --pretrained is ignored (the checkpoint holds the trained weights)")
    backbone, head, cfg = load_trained(path, args.arch, args.neck, args.height, args.width, args.layout, ibn=args.ibn,
                                       neck_type=args.neck_type, preprocess=args.preprocess)
    note_postprocessing(head, args.rerank, args.tlift)
    ds = load_dataset(args.dataset, args.data_root, args.combine_all, verbose=True)
    rows = evaluate_trained(backbone, head, cfg, ds, device=device, batch_size=args.batch_size,
                            workers=args.workers, rerank=args.rerank, tlift=args.tlift,
                            progress=not args.no_progress)
    print_table(rows, f"{os.path.basename(cfg['checkpoint'])} on {args.dataset}")
    if args.json:
        print(f"results: {write_json(args.json, rows)}")
    return 0


__all__ = ["load_trained", "evaluate_trained", "note_postprocessing", "print_table", "register", "run",
           "DATASET_CHOICES"]
