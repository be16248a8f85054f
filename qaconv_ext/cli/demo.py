"""``qaconv demo``: QAConv against the GAP + cosine baseline on the built-in synthetic camera network.

1. Generate (or re-use) the synthetic network (two domains in the Market-1501 layout).
2. Train QAConv (class-memory loss, the ECCV recipe) on ``domain_a``.
3. Train the baseline -- the same backbone, globally average-pooled features, cosine-softmax
   classifier -- on the same images with the same settings, seed and number of epochs.
3b. Train QAConv with the QAConv 2.x recipe (``gs``: graph sampling, hard triplet loss, the
   loss-driven schedule), shortened to ``--gs-epochs`` epochs, and evaluate it (one row, QAConv-GS).
4. Evaluate both on ``domain_b`` (direct cross-domain transfer, as in the paper's Table 2): QAConv
   scores every query/gallery pair with the fused op and the folded head, the baseline uses the
   cosine similarity. k-reciprocal re-ranking (+RR) and TLift on top of it add the rows of the
   paper's Table 3 (:func:`qaconv_ext.evaluation.evaluate_qaconv`).
5. Print the table, save ``qaconv.pt`` / ``baseline.pt``, ``results.json`` and a few pictures
   (a ranked list, correspondences) under ``--out``.

The defaults are sized to finish within minutes on a two-core CPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any, Dict

from .common import (
    ARCHITECTURE_CHOICES,
    CommandError,
    check_writable_folder,
    count_queries_or_exit,
    default_synthetic_root,
    non_negative_int,
    positive_float,
    positive_int,
    print_table,
    resolve_device,
    with_counts,
    write_json,
)

COMMAND = "qaconv demo"

#: What ``qaconv demo --help`` says the demo does (plain text).
DESCRIPTION = """QAConv against the GAP + cosine baseline on the built-in synthetic camera network:

  1. generate (or re-use) the synthetic network: two domains in the Market-1501 layout;
  2. train QAConv (class-memory loss) on domain_a;
  3. train the baseline (the same backbone, globally average-pooled features, a cosine-softmax
     classifier) on the same images with the same settings, seed and number of epochs;
     then QAConv with the QAConv 2.x recipe (gs: graph sampling, hard triplet loss, gradient
     clipping, loss-driven schedule; the demo's augmentations), shortened to --gs-epochs epochs;
  4. evaluate both on domain_b (direct cross-domain transfer): QAConv scores every query/gallery
     pair with the fused op, the baseline uses the cosine similarity; re-ranking (+RR) and TLift on
     top of QAConv add two more rows;
  5. print the table and save qaconv.pt, baseline.pt, results.json and a few pictures (a ranked
     list, correspondences) in the output folder, replacing those of an earlier demo there.

The defaults finish within minutes on a two-core CPU. A folder that holds a training run
(checkpoint.pt, written by `qaconv train`) is refused as the output folder."""

#: Demo settings, sized for a two-core CPU (the README's demo section gives the measured table).
DEMO_DEFAULTS: Dict[str, Any] = dict(arch="small", height=128, width=64, neck=128, epochs=15, batch_size=32,
                                     lr=0.05, step_size=11, workers=1, seed=0, gs_epochs=3, gs_batch_size=16)
#: The row of the QAConv 2.x recipe (graph sampling + triplet loss) in the demo's table.
GS_ROW = "QAConv-GS"
#: The demo's input preset: bilinear resize and ImageNet mean/std, what its README table was measured with
#: (``qaconv train`` defaults to the public code's preset instead).
DEMO_PREPROCESS = "imagenet"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command."""
    d = DEMO_DEFAULTS
    p = subparsers.add_parser(
        "demo", help="QAConv vs the GAP + cosine baseline on the built-in synthetic camera network",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None,
                   help="synthetic data cache (default: $QACONV_DATA/synthetic or data_cache/synthetic)")
    p.add_argument("--out", default=os.path.join("runs", "demo"),
                   help="output folder; the demo's files there are replaced (default: %(default)s)")
    p.add_argument("--arch", choices=ARCHITECTURE_CHOICES, default=d["arch"], help="backbone (default: %(default)s)")
    p.add_argument("--height", type=positive_int, default=d["height"], help="input height (default: %(default)s)")
    p.add_argument("--width", type=positive_int, default=d["width"], help="input width (default: %(default)s)")
    p.add_argument("--neck", type=positive_int, default=d["neck"], help="neck channels (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=d["epochs"],
                   help="epochs for each model (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"],
                   help="images per batch (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d["lr"],
                   help="learning rate (default: %(default)s)")
    p.add_argument("--step-size", type=positive_int, default=d["step_size"],
                   help="epochs before the learning rate is multiplied by 0.1 (default: %(default)s)")
    p.add_argument("--gs-epochs", type=non_negative_int, default=d["gs_epochs"],
                   help="epochs of the gs recipe's run, at most (the loss-driven schedule may end it earlier); "
                        "0 leaves the QAConv-GS row out (default: %(default)s)")
    p.add_argument("--gs-batch-size", type=positive_int, default=d["gs_batch_size"],
                   help="images per batch of the gs run, 2 per class (default: %(default)s)")
    p.add_argument("--amp", action="store_true",
                   help="evaluate with reduced precision: bfloat16 feature maps scored by the fused op's bfloat16 "
                        "kernel on the CPU (float32 accumulation), float16 autocast on CUDA")
    p.add_argument("--workers", type=non_negative_int, default=d["workers"],
                   help="data-loading processes, 0 to load in this process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-postprocess", action="store_true", help="skip the re-ranking and TLift rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def check_output_folder(out: str) -> None:
    """Refuse an output folder that is a file, cannot be written, or holds a training run of
    ``qaconv train`` (its ``checkpoint.pt``): the demo replaces its own files only."""
    from ..engine import CHECKPOINT_NAME

    if os.path.exists(out) and not os.path.isdir(out):
        raise CommandError(f"{COMMAND}: --out {out} is a file, not a folder")
    held = os.path.join(out, CHECKPOINT_NAME)
    if os.path.isfile(held):
        raise CommandError(f"{COMMAND}: --out {out} holds a training run ({held}, written by `qaconv train`); "
                           "give the demo another folder")
    check_writable_folder(out, "--out", COMMAND)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qaconv demo``."""
    results = run_demo(args)
    return 0 if results else 1


def run_demo(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the demo; returns the JSON record also written to ``--out/results.json``."""
    import torch

    from ..data import Market1501, make_synthetic_network
    from ..engine import TrainConfig, run_training
    from ..evaluation import evaluate_trained
    from .pictures import save_demo_pictures

    t_start = time.time()
    progress = not args.no_progress
    timings: Dict[str, float] = {}
    device = resolve_device(args.device, COMMAND)
    root = os.path.abspath(args.data_root or default_synthetic_root())
    out = os.path.abspath(args.out)
    check_output_folder(out)
    os.makedirs(out, exist_ok=True)

    t0 = time.time()
    paths = make_synthetic_network(root, progress=progress)
    train_ds, test_ds = Market1501(paths["domain_a"]), Market1501(paths["domain_b"])
    timings["data"] = time.time() - t0
    print(f"synthetic network in {root} ({timings['data']:.0f} s)")
    print(f"train: domain_a, {len(train_ds.train)} images of {train_ds.num_train_pids} identities; test: domain_b, "
          f"{len(test_ds.query)} queries, {len(test_ds.gallery)} gallery images")

    cfg = TrainConfig(method="qaconv", arch=args.arch, neck=args.neck, height=args.height, width=args.width,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, step_size=args.step_size,
                      workers=args.workers, seed=args.seed, device=device, dataset="synthetic-a",
                      data_root=root, preprocess=DEMO_PREPROCESS)
    extra = {"synthetic_root": root, "train_root": paths["domain_a"], "test_dataset": "synthetic-b",
             "test_root": paths["domain_b"]}
    print("settings: " + ", ".join(cfg.summary()) + f", device={device}, threads={torch.get_num_threads()}")

    trained = {}
    for method, name in (("qaconv", "qaconv.pt"), ("baseline", "baseline.pt")):
        t0 = time.time()
        print(f"\ntraining {'QAConv' if method == 'qaconv' else 'the GAP + cosine baseline'} on domain_a ...")
        trained[method] = run_training(cfg.replace(method=method), train_ds.train, train_ds.num_train_pids,
                                       checkpoint_dir=out, checkpoint_name=name, extra_config=extra,
                                       progress=progress)
        timings[f"train_{method}"] = time.time() - t0

    print("\nevaluating on domain_b ...")
    t0 = time.time()
    qa = trained["qaconv"]
    backbone, head = qa.model.eval(), qa.criterion.matcher.eval()
    post = not args.no_postprocess
    amp = True if args.amp else None
    table_rows = evaluate_trained(backbone, head, test_ds, cfg.height, cfg.width, device=device, rerank=post,
                                  tlift=post, progress=progress, amp=amp, preprocess=cfg.preprocess)
    timings["eval_qaconv"] = time.time() - t0
    t0 = time.time()
    table_rows.update(evaluate_trained(trained["baseline"].model, None, test_ds, cfg.height, cfg.width,
                                       device=device, progress=progress, preprocess=cfg.preprocess))
    timings["eval_baseline"] = time.time() - t0
    if args.gs_epochs:
        # QAConv 2.x's recipe on the same backbone and data: graph sampling, triplet loss, gradient clipping
        # at 8, the loss-driven schedule; the demo's learning rate and augmentations, and BatchNorms that
        # train (the network starts from scratch, not from ImageNet weights). The synthetic identities differ
        # mostly in colour, which the v2 colour jitter scrambles: with it the triplet loss stays at its margin.
        gs_cfg = cfg.replace(recipe="gs", epochs=args.gs_epochs, batch_size=args.gs_batch_size, clip_grad=8.0,
                             augment="eccv", freeze_bn=False)
        print(f"\ntraining QAConv with the gs recipe (graph sampling, triplet loss) on domain_a, at most "
              f"{args.gs_epochs} epochs of batch {args.gs_batch_size} ...")
        t0 = time.time()
        trained["gs"] = run_training(gs_cfg, train_ds.train, train_ds.num_train_pids, checkpoint_dir=out,
                                     checkpoint_name="qaconv_gs.pt", extra_config=extra, progress=progress)
        timings["train_gs"] = time.time() - t0
        t0 = time.time()
        gs_rows = evaluate_trained(trained["gs"].model.eval(), trained["gs"].criterion.matcher.eval(), test_ds,
                                   cfg.height, cfg.width, device=device, progress=progress, amp=amp,
                                   preprocess=cfg.preprocess)
        table_rows[GS_ROW] = next(iter(gs_rows.values()))
        timings["eval_gs"] = time.time() - t0
    timings["total"] = time.time() - t_start

    print()
    counts = count_queries_or_exit(test_ds, "synthetic domain_b", "qaconv demo")
    table = print_table(table_rows, "synthetic domain_a -> domain_b (direct transfer)", counts)
    training = sum(v for k, v in timings.items() if k.startswith("train_"))
    gs_note = f", QAConv-GS training {timings['train_gs']:.0f} s" if "train_gs" in timings else ""
    print(f"\nwall time {timings['total']:.0f} s (data {timings['data']:.0f} s, QAConv training "
          f"{timings['train_qaconv']:.0f} s, baseline training {timings['train_baseline']:.0f} s{gs_note}, evaluation "
          f"{timings['total'] - timings['data'] - training:.0f} s)")
    final = {k: {"loss": v.history[-1]["loss"], "acc": v.history[-1]["acc"], "epochs": len(v.history),
                 "epoch_time_s": round(sum(h["time"] for h in v.history) / len(v.history), 1),
                 "images_per_epoch": len(v.history) and v.history[-1]["batches"] * int(v.config["batch_size"])}
             for k, v in trained.items()}
    print("training time per epoch: " + ", ".join(f"{k} {v['epoch_time_s']:.1f} s ({v['images_per_epoch']} images)"
                                                  for k, v in final.items()))
    record = {
        "benchmark": "qaconv demo",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "amp": bool(args.amp),
        "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "method")},
        "gs_settings": ({k: v for k, v in gs_cfg.to_dict().items() if k not in ("extra", "method")}
                        if args.gs_epochs else None),
        "data": {"root": root, "train_images": len(train_ds.train), "train_ids": train_ds.num_train_pids,
                 "queries": len(test_ds.query), "gallery": len(test_ds.gallery)},
        "final_training": final,
        "results": with_counts(table_rows, counts),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "table": table,
    }
    pictures = save_demo_pictures(backbone, head, test_ds, os.path.join(out, "pictures"), height=cfg.height,
                                  width=cfg.width, preprocess=cfg.preprocess)
    record["pictures"] = pictures
    write_json(os.path.join(out, "results.json"), record)
    print("pictures (a ranked list, the correspondences with a true match and with an impostor):")
    for path in pictures:
        print(f"  {path}")
    print("draw your own: qaconv match IMAGE_A IMAGE_B -o out.png; qaconv rank --query-index 5 -o ranked.png")
    print(f"QAConv model: {os.path.join(out, 'qaconv.pt')}; baseline: {os.path.join(out, 'baseline.pt')}"
          + (f"; QAConv-GS: {os.path.join(out, 'qaconv_gs.pt')}" if args.gs_epochs else ""))
    print(f"results: {os.path.join(out, 'results.json')}")
    return record


__all__ = ["DEMO_DEFAULTS", "GS_ROW", "DEMO_PREPROCESS", "DESCRIPTION", "run_demo", "register", "run", "check_output_folder"]
