"""``qaconv train``: train QAConv (or the GAP baseline) on a re-id dataset, checkpointing every epoch.

A run lives in one folder (``--checkpoint-dir``, by default a new ``runs/train/<date>-<time>``): a
folder that holds a checkpoint already is refused unless the run is continued (``--resume``) or
replaced (``--overwrite``). ``--resume`` continues the run with the settings it was started with;
the settings are those of :data:`RUN_OPTIONS` (see :func:`settle_run_options`). Under ``torchrun``
training is data-parallel across the ranks (``--batch-size`` is the global batch); rank 0 prints,
chooses the run's folder and writes the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..config import RUN_OPTIONS
from .common import (
    DATASET_CHOICES,
    GS_DEFAULTS,
    INTERRUPTED,
    RECIPE_CHOICES,
    CommandError,
    add_dataset_command,
    add_postprocess_args,
    check_time_stamps,
    check_writable_folder,
    count_queries_or_exit,
    evaluate_or_exit,
    load_dataset,
    non_negative_float,
    note_postprocessing,
    positive_float,
    positive_int,
    print_table,
    resolve_device,
    with_counts,
    write_json,
)

__all__ = ["register", "run", "RUN_OPTIONS", "RUNS_DIR", "RunPlan", "plan_run", "settle_run_options",
           "check_run_inputs", "config_from_args", "resolve_test_root", "new_run_dir", "interrupted_message"]

COMMAND = "qaconv train"
DESCRIPTION = ("Train a QAConv model. --recipe eccv (the default) is the ECCV 2020 paper's: class-memory loss, SGD, "
               "lr 0.01 for new layers and 0.001 for a pretrained trunk, x0.1 after 40 epochs, 60 epochs, Random "
               "Block. --recipe gs is QAConv 2.x's: graph sampling (each batch a class and its nearest classes by "
               "the current model's QAConv distances, 2 images each), hard triplet loss, batch 64, lr 0.005, "
               "gradient clipping at 8, the v2 augmentations, frozen backbone BatchNorms, lr x0.1 once the epoch "
               "loss falls below 0.7 x the second epoch's and then half as many epochs again (at most --epochs). "
               "A checkpoint is "
               "written atomically after every epoch into the run's folder (default: a new folder "
               "runs/train/DATE-TIME). --resume continues a run exactly, with the settings it was started with.")

#: Where new runs go when no --checkpoint-dir is given: a new dated folder each.
RUNS_DIR = os.path.join("runs", "train")

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


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command."""
    p = add_dataset_command(subparsers, "train", "train QAConv (or the GAP baseline) on a dataset", DESCRIPTION,
                            dataset_required=False)
    p.set_defaults(combine_all=None, skip_bad_images=None)   # None: not given (a resumed run keeps its own)
    p.add_argument("--method", choices=("qaconv", "baseline"), default=None,
                   help="qaconv: QAConv (loss per --recipe); baseline: GAP + cosine softmax (default: qaconv)")
    p.add_argument("--recipe", choices=RECIPE_CHOICES, default=None,
                   help="eccv: class-memory loss, step schedule (ECCV 2020); gs: graph sampling, hard triplet loss, "
                        "loss-driven schedule (QAConv 2.x; its defaults: "
                        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in GS_DEFAULTS.items()) + ") (default: eccv)")
    p.add_argument("--mem-batch-size", type=positive_int, default=None, metavar="N",
                   help="eccv: match the class memory in chunks of N classes, each with its own BatchNorm "
                        "statistics (public code v1.2+, which uses 16) (default: all classes at once, ECCV 2020)")
    p.add_argument("--num-instance", type=positive_int, default=None, metavar="K",
                   help="gs: images per class in a batch; the batch size must be a multiple (default: 2)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs to train, with --recipe gs at most (default: 60); with --resume, more than the run "
                        "planned extends it")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate of new layers (default: 0.01; 0.005 with --recipe gs)")
    p.add_argument("--base-lr-mult", type=non_negative_float, default=None,
                   help="trunk lr = lr x this (default: 0.1 with --pretrained, else 1)")
    p.add_argument("--step-size", type=positive_int, default=None,
                   help="epochs between x0.1 learning-rate decays (default: 40)")
    p.add_argument("--weight-decay", type=non_negative_float, default=None, help="SGD weight decay (default: 0.0005)")
    p.add_argument("--no-random-block", dest="random_block", action="store_false", default=None,
                   help="no Random Block augmentation")
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no horizontal flips")
    freeze = p.add_mutually_exclusive_group()
    freeze.add_argument("--freeze-bn", action="store_true", default=None,
                        help="keep the backbone's BatchNorms frozen (eval mode) (default: off; on with --recipe gs)")
    freeze.add_argument("--no-freeze-bn", dest="freeze_bn", action="store_false",
                        help="train the backbone's BatchNorms (also with --recipe gs)")
    p.add_argument("--clip-grad", type=non_negative_float, default=None,
                   help="max gradient norm, 0 for no clipping (default: 0; 8 with --recipe gs)")
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_true", default=None,
                     help="mixed precision: float16 on CUDA (the default there), bfloat16 on the CPU")
    amp.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision, also on CUDA")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help=f"the run's folder, where checkpoint.pt is written after every epoch (default: a new folder "
                        f"{os.path.join(RUNS_DIR, 'DATE-TIME')}; with --resume PATH, the folder of PATH)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue a run (a checkpoint file or a run folder; without PATH, --checkpoint-dir) with "
                        "the settings it was started with; options given again must agree with them")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --checkpoint-dir that holds a checkpoint (it is replaced after the "
                        "first epoch)")
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


# ----------------------------------------------------------------------------------------------
# The run's folder and the checkpoint it continues
# ----------------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    """Where a run is written and what it continues.

    ``checkpoint_dir``: the run's folder (None: a new :func:`new_run_dir`, made when training starts);
    ``resume``: the checkpoint continued (None for a new run), ``saved``: its config, ``done``: the
    epochs it completed, ``scheduler``: its scheduler state.
    """

    checkpoint_dir: Optional[str]
    resume: Optional[str] = None
    saved: Optional[Dict[str, Any]] = None
    done: int = 0
    scheduler: Optional[Dict[str, Any]] = None


def new_run_dir(base: str = RUNS_DIR, stamp: Optional[str] = None) -> str:
    """Create and return a new folder ``base/<date>-<time>`` (``-2``, ``-3``, ... appended when that
    name is taken, also by a run starting at the same moment)."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(base, exist_ok=True)
    for n in range(1, 10000):
        path = os.path.join(base, stamp if n == 1 else f"{stamp}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise CommandError(f"{COMMAND}: no free run folder name in {base} for {stamp}")


def _read_checkpoint(path: str, option: str) -> Dict[str, Any]:
    from ..engine import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, mmap=True)
    except CheckpointError as exc:
        raise CommandError(f"{COMMAND}: {option}: {exc}") from None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def plan_run(args: argparse.Namespace) -> RunPlan:
    """The run's folder and the checkpoint ``--resume`` names (read now, so that a wrong file or
    folder ends the command at once). A folder that already holds a ``checkpoint.pt`` other than the
    one continued is refused unless ``--overwrite`` is given."""
    from ..engine import CHECKPOINT_NAME, find_checkpoint
    from ..engine.checkpoint import missing_checkpoint_message
    from ..engine.resume import saved_settings

    plan = RunPlan(checkpoint_dir=args.checkpoint_dir)
    if args.resume:
        target = args.checkpoint_dir if args.resume == "auto" else args.resume
        if target is None:
            raise CommandError(f"{COMMAND}: --resume without PATH continues the run in --checkpoint-dir; give "
                               f"the run: --resume RUN_FOLDER (e.g. {os.path.join(RUNS_DIR, 'DATE-TIME')}) or "
                               "--checkpoint-dir RUN_FOLDER")
        found = find_checkpoint(target)
        if found is None:
            raise CommandError(f"{COMMAND}: --resume: {missing_checkpoint_message(target)}")
        ckpt = _read_checkpoint(found, "--resume")
        if "config" not in ckpt and "format" not in ckpt and "model" in ckpt:
            raise CommandError(f"{COMMAND}: --resume: {found} was written by the public QAConv code; it can be "
                               f"evaluated (qaconv eval --checkpoint {found}) but not resumed here")
        plan.resume, plan.done = found, int(ckpt.get("epoch", 0))
        plan.saved = saved_settings(ckpt.get("config"))
        plan.scheduler = ckpt.get("scheduler")
        if plan.checkpoint_dir is None:
            plan.checkpoint_dir = os.path.dirname(os.path.abspath(found))
    if plan.checkpoint_dir is not None:
        target = os.path.join(plan.checkpoint_dir, CHECKPOINT_NAME)
        continued = plan.resume is not None and _same_file(target, plan.resume)
        if os.path.isfile(target) and not continued and not args.overwrite:
            raise CommandError(f"{COMMAND}: {target} already holds a run{_progress(target)}; continue it with "
                               "--resume, replace it with --overwrite, or give another --checkpoint-dir")
    return plan


def interrupted_message(folder: str, removed: bool, argv: Optional[List[str]], started: Optional[float] = None
                        ) -> str:
    """What an interrupted training run kept: the last checkpoint and the command that continues it, or
    that nothing was saved (the interruption came in the first epoch) and the command that starts it again.
    ``removed``: the run's new folder was removed; ``started``: when a new run started (a checkpoint
    written before is the run it replaces with ``--overwrite``, not this one)."""
    from ..engine import find_checkpoint

    found = None if removed else find_checkpoint(folder)
    if found is not None and (started is None or os.path.getmtime(found) >= started):
        return (f"{COMMAND}: interrupted; {found} holds the run up to the last finished epoch{_progress(found)}: "
                f"continue it with `qaconv train --resume {shlex.quote(folder)}`")
    again = "qaconv " + shlex.join(argv) if argv else "the same qaconv train command"
    if removed:
        where = f"the new run folder {folder} was removed"
    elif found is not None:
        where = f"{found} still holds the run it was to replace"
    else:
        where = f"{folder} holds no checkpoint"
    return (f"{COMMAND}: interrupted in the first epoch, before any checkpoint: nothing was saved ({where}); "
            f"start again with `{again}`")


def _progress(path: str) -> str:
    """`` (epoch 3 of 8)`` for a readable checkpoint, else ``""``."""
    from ..engine import load_checkpoint

    try:
        ckpt = load_checkpoint(path, mmap=True)
        planned = (ckpt.get("config") or {}).get("epochs")
        return f" (epoch {int(ckpt['epoch'])}" + (f" of {int(planned)})" if planned else ")")
    except Exception:  # noqa: BLE001 - only a detail of the message
        return ""


# ----------------------------------------------------------------------------------------------
# Settings: a new run's defaults, or the resumed run's own
# ----------------------------------------------------------------------------------------------

def settle_run_options(args: argparse.Namespace, plan: Optional[RunPlan] = None) -> List[str]:
    """Fill in every :data:`~qaconv_ext.engine.resume.RUN_OPTIONS` not given on the command line (and
    ``--dataset``, ``--data-root``, ``--combine-all``, ``--skip-bad-images``); returns lines to print.

    A new run takes ``TrainConfig``'s defaults. A resumed run (``plan.resume``) takes its checkpoint's
    settings by :func:`qaconv_ext.engine.resume.settle_resume` (the rule ``Trainer.resume`` applies too);
    a conflict ends the command with its one line.
    """
    from ..engine.resume import ResumeConflict, new_run_settings, settle_resume

    if plan is None or plan.resume is None:
        defaults = new_run_settings(args.recipe)
        if args.dataset is None:
            raise CommandError(f"{COMMAND}: --dataset is required (or --resume a run)")
        for key in RUN_OPTIONS:
            if getattr(args, key) is None:
                setattr(args, key, defaults[key])
        args.combine_all, args.skip_bad_images = bool(args.combine_all), bool(args.skip_bad_images)
        return []

    saved = plan.saved or {}
    given = {k: getattr(args, k) for k in (*RUN_OPTIONS, "dataset", "combine_all")}
    try:
        settled, notes = settle_resume(saved, plan.done, given, run=plan.resume, scheduler=plan.scheduler)
    except ResumeConflict as exc:
        raise CommandError(f"{COMMAND}: {exc}") from None
    for key, value in settled.items():
        setattr(args, key, value)
    if args.dataset is None:
        raise CommandError(f"{COMMAND}: --resume: {plan.resume} does not record its dataset; give --dataset")
    if args.data_root is None and saved.get("data_root"):
        args.data_root = saved["data_root"]
    if args.skip_bad_images is None:
        args.skip_bad_images = bool(saved.get("skip_bad_images", False))
    return notes


def config_from_args(args: argparse.Namespace, device: str, saved: Optional[Dict[str, Any]] = None
                     ) -> "TrainConfig":  # noqa: F821
    """A :class:`~qaconv_ext.engine.TrainConfig` from parsed ``train`` arguments whose options are
    settled (:func:`settle_run_options`), for ``device`` (:func:`resolve_device`). ``saved``: the
    config of the run continued, whose other fields (momentum, gamma, ...) are kept."""
    import dataclasses

    from ..engine import TrainConfig
    from ..models import IBN_ARCHITECTURES

    if args.ibn not in (None, "none") and args.arch not in IBN_ARCHITECTURES:
        raise CommandError(f"{COMMAND}: --ibn {args.ibn}: IBN-Net exists for {', '.join(IBN_ARCHITECTURES)}, "
                           f"not for --arch {args.arch}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: Dict[str, Any] = {k: v for k, v in (saved or {}).items() if k in fields}
    values.update({k: getattr(args, k) for k in RUN_OPTIONS})
    values["ibn"] = None if args.ibn in (None, "none") else args.ibn
    if saved is None and args.pretrained:
        values["pretrained"] = os.path.abspath(args.pretrained)
    data_root = args.data_root or ""
    if saved is None or data_root != saved.get("data_root", ""):
        data_root = os.path.abspath(data_root) if data_root else ""
    values.update(device=device, dataset=args.dataset, data_root=data_root)
    cfg = TrainConfig(**values)
    if cfg.recipe == "gs" and args.mem_batch_size is not None and saved is None:
        raise CommandError(f"{COMMAND}: --mem-batch-size applies to the class memory of --recipe eccv, not to "
                           "--recipe gs")
    try:
        cfg.check_recipe()
    except ValueError as exc:
        hint = "; give --batch-size and --num-instance that fit" if "multiple" in str(exc) else ""
        raise CommandError(f"{COMMAND}: {exc}{hint}") from None
    return cfg


# ----------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------

def check_run_inputs(args: argparse.Namespace, cfg: Any, plan: RunPlan) -> None:
    """What can be checked before reading any image: the run's folder can be written, and the
    ``--pretrained`` file loads into the backbone of ``--arch``."""
    check_writable_folder(plan.checkpoint_dir or RUNS_DIR, "--checkpoint-dir", COMMAND)
    if cfg.pretrained:
        from ..models import PretrainedWeightsError, build_backbone

        try:
            build_backbone(cfg.arch, pretrained_path=cfg.pretrained, neck=cfg.neck)
        except (PretrainedWeightsError, FileNotFoundError) as exc:
            why = " (a resumed run reads it again to build its model)" if plan.resume else ""
            raise CommandError(f"{COMMAND}: --pretrained: {exc}{why}") from None


def check_training_data(ds: Any, cfg: Any, plan: RunPlan) -> None:
    """The training set can fill a batch, and a resumed run reads the same images as before."""
    n = len(ds.train)
    if cfg.recipe == "gs":
        need = cfg.batch_size // cfg.num_instance
        if ds.num_train_pids < need:
            raise CommandError(f"{COMMAND}: --recipe gs: a batch of {cfg.batch_size} images with --num-instance "
                               f"{cfg.num_instance} needs {need} classes, {cfg.dataset} in {ds.root} has "
                               f"{ds.num_train_pids}; give a smaller --batch-size")
    elif cfg.batch_size > n:
        raise CommandError(f"{COMMAND}: --batch-size {cfg.batch_size} is larger than the {n} training images of "
                           f"{cfg.dataset} in {ds.root}; give at most {n}")
    saved = plan.saved
    if saved is None:
        return
    differs = []
    if saved.get("train_root") and os.path.abspath(saved["train_root"]) != os.path.abspath(ds.root):
        differs.append(f"images: {saved['train_root']} in the checkpoint, {ds.root} now")
    if saved.get("num_classes") is not None and int(saved["num_classes"]) != ds.num_train_pids:
        differs.append(f"identities: {saved['num_classes']} in the checkpoint, {ds.num_train_pids} now")
    if saved.get("train_images") is not None and int(saved["train_images"]) != n:
        differs.append(f"training images: {saved['train_images']} in the checkpoint, {n} now")
    if differs:
        raise CommandError(f"{COMMAND}: --resume: the training data differ from the run's: {'; '.join(differs)}")


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def _lr_now(cfg: Any, plan: RunPlan) -> float:
    """The new layers' learning rate after ``plan.done`` epochs of the step schedule (the restored
    scheduler's own step size and decay when it has them)."""
    sched = plan.scheduler or {}
    if sched.get("kind") == "loss_drop":
        return cfg.lr * (float(sched.get("gamma", cfg.gamma)) if sched.get("stepped_at") else 1.0)
    step = int(sched.get("step_size", cfg.step_size))
    gamma = float(sched.get("gamma", cfg.gamma))
    return cfg.lr * gamma ** (plan.done // max(1, step))


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
            return _run(args, device if env is None else str(env.device), dist)
    finally:
        if env is not None:
            shutdown()


def _claim_run_dir(dist: Any) -> str:
    """A new :func:`new_run_dir`, made by rank 0 and shared with the other ranks."""
    if dist is None:
        return new_run_dir()
    from ..distributed import all_gather_objects

    return all_gather_objects(new_run_dir() if dist.is_main else None)[0]


def _run(args: argparse.Namespace, device: str, dist: Any) -> int:
    """Everything that can fail before the first epoch is checked first: the device, the run's folder,
    the checkpoint to resume and its settings, the pretrained weights, the training and the test
    dataset. Then train and, with ``--test-dataset``, evaluate."""
    if args.sync_bn and dist is None:
        print(f"{COMMAND}: note: --sync-bn applies to training across processes (torchrun); ignored")
    plan = plan_run(args)
    for line in settle_run_options(args, plan):
        print(line)
    cfg = config_from_args(args, device, plan.saved)
    check_run_inputs(args, cfg, plan)
    splits = ("train", "query", "gallery") if args.combine_all else ("train",)
    ds = load_dataset(cfg.dataset, args.data_root, args.combine_all, verbose=True, splits=splits,
                      skip_bad_images=args.skip_bad_images, command=COMMAND)
    check_training_data(ds, cfg, plan)
    saved = plan.saved or {}
    extra: Dict[str, Any] = {k: saved[k] for k in ("test_dataset", "test_root") if k in saved}
    extra.update(train_root=ds.root, train_images=len(ds.train), combine_all=bool(args.combine_all),
                 skip_bad_images=bool(args.skip_bad_images))
    test = counts = None
    if args.test_dataset:
        test = load_dataset(args.test_dataset, resolve_test_root(args), verbose=True, option="--test-root",
                            splits=("query", "gallery"), skip_bad_images=args.skip_bad_images, command=COMMAND)
        counts = count_queries_or_exit(test, args.test_dataset, COMMAND)
        if args.tlift and cfg.method == "qaconv":
            check_time_stamps(test, args.test_dataset, COMMAND)
        extra.update(test_dataset=args.test_dataset, test_root=test.root)
    folder = plan.checkpoint_dir or _claim_run_dir(dist)
    print(f"run folder: {folder}" + ("" if plan.checkpoint_dir else " (new; --checkpoint-dir chooses one)"))
    started = time.time()
    try:
        trainer = _train(cfg, ds, plan, folder, extra, args, dist)
    except BaseException as exc:
        removed = False
        if plan.checkpoint_dir is None and (dist is None or dist.is_main):
            try:   # a new folder that got no checkpoint: leave nothing behind
                os.rmdir(folder)
                removed = True
            except OSError:
                pass
        if isinstance(exc, KeyboardInterrupt) and (dist is None or dist.is_main):
            older = None if plan.resume else started   # a checkpoint older than a new run is not this run's
            raise CommandError(interrupted_message(folder, removed, getattr(args, "argv", None), older),
                               INTERRUPTED) from None
        raise
    if test is not None:
        head = getattr(trainer.criterion, "matcher", None)
        note_postprocessing(head, args.rerank, args.tlift, COMMAND)
        evaluate = None
        if dist is not None:
            from ..distributed import sharded_evaluate_trained as evaluate
        rows = evaluate_or_exit(COMMAND, trainer.model, head, test, cfg.height, cfg.width, evaluate=evaluate,
                                device=cfg.device, batch_size=max(64, cfg.batch_size), workers=cfg.workers,
                                rerank=args.rerank, tlift=args.tlift, progress=not args.no_progress)
        if rows is None:  # not the main rank
            return 0
        print_table(rows, f"{cfg.dataset} -> {args.test_dataset}", counts)
        out = write_json(os.path.join(folder, f"results_{args.test_dataset}.json"), with_counts(rows, counts))
        print(f"results: {out}")
    return 0


def _train(cfg: Any, ds: Any, plan: RunPlan, folder: str, extra: Dict[str, Any], args: argparse.Namespace,
           dist: Any) -> Any:
    """Print the settings and train (:func:`qaconv_ext.engine.run_training`); returns the trainer."""
    from ..engine import run_training

    where = "" if dist is None else f" x {dist.world_size} processes"
    print("training " + ", ".join(cfg.summary()) + f" on {cfg.device}{where}; {len(ds.train)} images, "
          f"{ds.num_train_pids} identities")
    if plan.resume:
        print(f"continuing after epoch {plan.done} of {cfg.epochs}: learning rate of new layers now "
              f"{_lr_now(cfg, plan):g}")
    t0 = time.time()
    trainer = run_training(cfg, ds.train, ds.num_train_pids, checkpoint_dir=folder, resume=plan.resume,
                           extra_config=extra, progress=not args.no_progress and (dist is None or dist.is_main),
                           dist=dist)
    print(f"trained in {time.time() - t0:.0f} s; checkpoint: {trainer.checkpoint_path}")
    return trainer
