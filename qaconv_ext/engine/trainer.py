"""The training loop: SGD with per-group learning rates, step schedule, checkpoints, exact resume.

``Trainer.fit(loader, epochs)`` trains from the current epoch to ``epochs``, stepping the scheduler
and writing ``checkpoint_dir/checkpoint.pt`` (atomically) after every epoch. ``Trainer.resume(path)``
restores model, criterion (class memory, head statistics), optimiser, scheduler, AMP scaler and
every RNG state (Python, NumPy, torch, CUDA, the data loader's generator), so an interrupted run
continues exactly as if it had not stopped.

A run that diverges stops with :class:`TrainingDiverged` (naming the epoch and the step): after
``max_bad_steps`` consecutive batches whose loss is not finite (default :data:`MAX_BAD_STEPS`), or when
the weights or the class memory are not finite at the end of an epoch. Such a state is never written
over the last good checkpoint.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import GraphSampler, ImageDataset, build_train_transform
from ..head import QAConv
from ..losses import ClassMemoryLoss, CosineSoftmaxLoss, TripletLoss
from ..models import build_backbone, feature_map_size
from ..scoring import qaconv_distance_fn
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainConfig
from .resume import RUN_OPTIONS, saved_settings, settle_resume

__all__ = ["Trainer", "run_training", "build_optimizer", "build_scheduler", "build_train_loader", "build_model",
           "build_graph_sampler", "LossDropSchedule", "seed_everything", "TrainingDiverged", "MAX_BAD_STEPS"]

#: Consecutive batches with a non-finite loss after which training stops (a single bad batch is skipped:
#: no optimiser step, counted in the epoch's ``skipped_batches``).
MAX_BAD_STEPS = 3


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or non-finite weights; ``epoch`` (1-based) and ``step``
    (1-based batch of that epoch) say where. The message is one line."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = int(epoch)
        self.step = int(step)


def _non_finite_entries(*modules: nn.Module, limit: int = 3) -> Tuple[int, List[str]]:
    """How many floating-point parameters and buffers (class memory, BN statistics) of ``modules`` hold
    a NaN or Inf, and the names of the first ``limit``."""
    entries = [(f"{prefix}.{name}", t) for prefix, module in zip(("model", "criterion"), modules)
               for name, t in module.state_dict().items() if t.is_floating_point() and t.numel()]
    if not entries:
        return 0, []
    flags = [torch.isfinite(t).all() for _, t in entries]
    ok = torch.stack([f.to(flags[0].device) for f in flags]).cpu()  # one synchronisation
    bad = [name for (name, _), good in zip(entries, ok.tolist()) if not good]
    return len(bad), bad[:limit]


_ADVICE = "lower the learning rate or clip the gradients"


def _length(loader: Any) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _trunk_parameters(model: nn.Module) -> List[nn.Parameter]:
    base = getattr(model, "base", None)
    return list(base.parameters()) if isinstance(base, nn.Module) else []


def build_optimizer(model: nn.Module, criterion: nn.Module, lr: float, base_lr_mult: float = 0.1,
                    momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True
                    ) -> torch.optim.SGD:
    """SGD with three groups: the pretrained trunk (``model.base``, ``lr * base_lr_mult``), the rest
    of the model (neck, ``lr``) and the criterion's parameters (head or classifier, ``lr``)."""
    trunk = _trunk_parameters(model)
    trunk_ids = {id(p) for p in trunk}
    new = [p for p in model.parameters() if id(p) not in trunk_ids]
    groups = [{"params": trunk, "lr": lr * base_lr_mult, "name": "trunk"},
              {"params": new, "lr": lr, "name": "new"},
              {"params": list(criterion.parameters()), "lr": lr, "name": "criterion"}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, step_size: int, gamma: float = 0.1
                    ) -> torch.optim.lr_scheduler.StepLR:
    """Multiply every group's learning rate by ``gamma`` each ``step_size`` epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(step_size)), gamma=gamma)


class LossDropSchedule:
    """The loss-driven schedule of QAConv 2.x (``step(loss)`` after every epoch).

    The loss of epoch ``base_epoch`` (1-based; the public code takes its second epoch, index 1) is the
    reference. After the first later epoch whose mean loss is below ``factor`` x that reference, every
    group's learning rate is multiplied by ``gamma`` once, and the run ends after half as many epochs
    again: :attr:`final_epochs` = ``e + e // 2`` for a step after epoch ``e`` (the trainer also stops at
    its ``epochs``, the public ``max_epochs``). Until then :attr:`final_epochs` is None.
    """

    needs_loss = True

    def __init__(self, optimizer: torch.optim.Optimizer, factor: float = 0.7, gamma: float = 0.1,
                 base_epoch: int = 2) -> None:
        self.optimizer = optimizer
        self.factor, self.gamma, self.base_epoch = float(factor), float(gamma), int(base_epoch)
        self.epoch = 0
        self.base_loss: Optional[float] = None
        self.stepped_at: Optional[int] = None
        self.final_epochs: Optional[int] = None

    def step(self, loss: float) -> bool:
        """Record one epoch's mean loss; True when the learning rate was lowered now."""
        self.epoch += 1
        if self.epoch == self.base_epoch:
            self.base_loss = float(loss)
        if self.stepped_at is None and self.base_loss is not None and float(loss) < self.base_loss * self.factor:
            self.stepped_at = self.epoch
            self.final_epochs = self.epoch + self.epoch // 2
            for group in self.optimizer.param_groups:
                group["lr"] *= self.gamma
            return True
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "loss_drop", "factor": self.factor, "gamma": self.gamma, "base_epoch": self.base_epoch,
                "epoch": self.epoch, "base_loss": self.base_loss, "stepped_at": self.stepped_at,
                "final_epochs": self.final_epochs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.factor, self.gamma = float(state["factor"]), float(state["gamma"])
        self.base_epoch, self.epoch = int(state["base_epoch"]), int(state["epoch"])
        self.base_loss, self.stepped_at = state["base_loss"], state["stepped_at"]
        self.final_epochs = state["final_epochs"]


def build_graph_sampler(records: Sequence[Any], cfg: TrainConfig, model: nn.Module, matcher: nn.Module,
                        progress: bool = True) -> Any:
    """The ``gs`` recipe's :class:`~qaconv_ext.data.GraphSampler` over ``records``: ``cfg.batch_size``,
    ``cfg.num_instance``, QAConv distances from ``model`` and ``matcher`` on ``cfg.device`` with the run's
    input preset (:func:`~qaconv_ext.scoring.qaconv_distance_fn`), its own generator seeded from
    ``cfg.seed`` (its state goes into checkpoints)."""
    distances = qaconv_distance_fn(model, matcher, records, cfg.height, cfg.width, preprocess=cfg.preprocess,
                                   device=cfg.device, progress=progress)
    return GraphSampler(records, cfg.batch_size, cfg.num_instance, distances, seed=int(cfg.seed))


def build_train_loader(records: Sequence[Any], cfg: TrainConfig,
                       generator: Optional[torch.Generator] = None, sampler: Optional[Any] = None) -> DataLoader:
    """Shuffled, ``drop_last`` loader over training records with ``cfg``'s preset and augmentation.

    ``generator`` (default: seeded from ``cfg.seed``) drives the shuffling and the worker seeds; its
    state goes into checkpoints. ``sampler`` (the ``gs`` recipe's :func:`build_graph_sampler`): the
    indices of each epoch come from it instead, cut into batches of ``cfg.batch_size``.
    """
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(int(cfg.seed))
    ds = ImageDataset(records, build_train_transform(cfg.height, cfg.width, random_block=cfg.random_block,
                                                     flip=cfg.flip, preprocess=cfg.preprocess, augment=cfg.augment))
    if sampler is not None:
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.workers,
                          generator=generator, pin_memory=cfg.device.startswith("cuda"), persistent_workers=False)
    if len(ds) < cfg.batch_size:
        raise ValueError(f"{len(ds)} training images is less than one batch of {cfg.batch_size}")
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.workers,
                      generator=generator, pin_memory=cfg.device.startswith("cuda"),
                      persistent_workers=False)


def build_model(cfg: TrainConfig, num_classes: int) -> Tuple[nn.Module, nn.Module]:
    """``(backbone, criterion)`` for ``cfg.method`` and ``cfg.recipe``: QAConv with the class-memory loss
    (``eccv``) or the hard triplet loss (``gs``), or the GAP baseline."""

    cfg.check_recipe()

    backbone = build_backbone(cfg.arch, pretrained_path=cfg.pretrained, neck=cfg.neck, ibn=cfg.ibn,
                              neck_type=cfg.neck_type)
    d, h, w = feature_map_size(backbone, cfg.height, cfg.width)
    if cfg.method == "qaconv" and cfg.recipe == "gs":
        criterion: nn.Module = TripletLoss(QAConv(d, h, w, layout=cfg.layout), margin=cfg.margin)
    elif cfg.method == "qaconv":
        criterion = ClassMemoryLoss(QAConv(d, h, w, layout=cfg.layout), num_classes, d, h, w,
                                    mem_batch_size=cfg.mem_batch_size)
    elif cfg.method == "baseline":
        criterion = CosineSoftmaxLoss(d, num_classes, scale=cfg.baseline_scale)
    else:
        raise ValueError(f"unknown method {cfg.method!r}; use 'qaconv' or 'baseline'")
    return backbone, criterion


class _Mean:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int) -> None:
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


class Trainer:
    """Trains ``model`` (images -> feature maps) with ``criterion`` (features, labels -> loss, acc).

    Args:
        model: backbone; ``model.base`` (if present) is the pretrained trunk.
        criterion: :class:`~qaconv_ext.ClassMemoryLoss`, a cosine-softmax loss, or any module with that
            signature returning per-sample ``(loss [B], acc [B])``.
        optimizer, scheduler: see :func:`build_optimizer`, :func:`build_scheduler` (stepped per epoch).
        device: where to train. amp: mixed precision -- float16 autocast with gradient scaling on CUDA
            (the default there), bfloat16 autocast on the CPU (off by default).
        clip_grad: max gradient norm per module (0: off). freeze_bn: keep the model's BatchNorms in eval mode.
        loader_generator: the data loader's generator (its state is checkpointed).
        checkpoint_dir: where ``checkpoint_name`` is written after every epoch (None: not written).
        config: a :class:`TrainConfig` or plain dict stored in checkpoints.
        progress: show tqdm bars.
        max_bad_steps: consecutive batches with a non-finite loss after which :class:`TrainingDiverged`
            is raised (fewer are skipped and counted).
        dist: training across processes (:class:`qaconv_ext.distributed.DistributedTraining`): it wraps
            the model and the criterion for the step, gathers each step's batch from all ranks before
            the loss, and only its main rank writes checkpoints. None: one process.
        sampler: a sampler with state (the ``gs`` recipe's graph sampler): its ``state_dict`` goes into
            checkpoints and is restored on resume.

    A scheduler with ``needs_loss`` (:class:`LossDropSchedule`) is stepped with the epoch's mean loss, and
    its ``final_epochs``, once set, ends the run early.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Optional[Any] = None, *, device: Union[str, torch.device] = "cpu",
                 amp: Optional[bool] = None, clip_grad: float = 0.0, freeze_bn: bool = False,
                 loader_generator: Optional[torch.Generator] = None, checkpoint_dir: Optional[str] = None,
                 config: Union[TrainConfig, Dict[str, Any], None] = None, progress: bool = True,
                 log: Callable[[str], None] = print, checkpoint_name: str = CHECKPOINT_NAME,
                 max_bad_steps: int = MAX_BAD_STEPS, dist: Optional[Any] = None,
                 sampler: Optional[Any] = None) -> None:
        if int(max_bad_steps) != max_bad_steps or max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be a positive integer, got {max_bad_steps}")
        self.max_bad_steps = int(max_bad_steps)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.criterion = criterion.to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.amp = bool(self.device.type == "cuda" if amp is None else amp)
        if self.amp and self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"amp: mixed precision is supported on CUDA and the CPU, not on {self.device.type}")
        # float16 needs loss scaling; bfloat16 has float32's range and does not
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.device.type == "cuda" else None
        self.clip_grad = float(clip_grad)
        self.freeze_bn = bool(freeze_bn)
        self.loader_generator = loader_generator
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_name = checkpoint_name
        self.config = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
        self.progress = progress
        self.log = log
        self.epoch = 0
        self.history: List[Dict[str, float]] = []
        self.dist = dist
        self.sampler = sampler
        # the modules called in a step (wrapped for data parallelism); self.model/self.criterion stay plain
        self._step_model, self._step_criterion = (dist.prepare(self.model, self.criterion) if dist is not None
                                                  else (self.model, self.criterion))

    # ------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[str]:
        """``checkpoint_dir/checkpoint_name`` (default ``checkpoint.pt``) or None."""
        return os.path.join(self.checkpoint_dir, self.checkpoint_name) if self.checkpoint_dir else None

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.criterion.train()

    def train_epoch(self, loader: Any, epoch: Optional[int] = None, epochs: Optional[int] = None
                    ) -> Dict[str, float]:
        """One pass over ``loader`` (batches ``(images, labels, ...)``); returns mean loss, acc, time.

        A batch whose loss is not finite for every sample counts as bad: when none is finite it is skipped
        (no step), otherwise the step uses the finite samples. :class:`TrainingDiverged` is raised after
        ``max_bad_steps`` consecutive bad batches.
        """
        from tqdm.auto import tqdm

        epoch = self.epoch if epoch is None else epoch
        self._set_train_mode()
        losses, accs = _Mean(), _Mean()
        skipped = 0
        bad_run = 0  # consecutive batches with a non-finite loss
        step = 0
        t0 = time.time()
        total = epochs if epochs is not None else "?"
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{total}", leave=False, disable=not self.progress,
                   dynamic_ncols=True)
        for step, batch in enumerate(bar, 1):
            images = batch[0].to(self.device, non_blocking=True)
            targets = batch[1].to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                feature = self._step_model(images)
                if self.dist is not None:
                    feature, targets = self.dist.gather(feature, targets)
                loss_vec, acc_vec = self._step_criterion(feature, targets)
            finite = torch.isfinite(loss_vec)
            n = int(finite.sum())
            if n < finite.numel():
                bad_run += 1
                if bad_run >= self.max_bad_steps:
                    bar.close()
                    self._raise_loss_diverged(epoch, step, _length(loader), bad_run)
                if n == 0:
                    skipped += 1
                    continue
            else:
                bad_run = 0
            loss = loss_vec[finite].float().mean()
            acc = acc_vec[finite].detach().float().mean()
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if self.clip_grad > 0:
                    self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.clip_grad > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
                nn.utils.clip_grad_norm_(self.criterion.parameters(), self.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            losses.update(loss.item(), n)
            accs.update(acc.item(), n)
            bar.set_postfix(loss=f"{losses.avg:.3f}", acc=f"{100 * accs.avg:.1f}%")
        bar.close()
        stats = {"epoch": epoch + 1, "loss": losses.avg, "acc": accs.avg, "time": time.time() - t0,
                 "lr": [float(g["lr"]) for g in self.optimizer.param_groups], "skipped_batches": skipped,
                 "batches": step}
        return stats

    def _kept_checkpoint_note(self) -> str:
        path = self.checkpoint_path
        if path and os.path.isfile(path):
            return f"; the last checkpoint {path} is left as it was"
        return ""

    def _state_note(self) -> str:
        """``"N weight/memory tensors are not finite ..."`` or ``""`` when every one is finite."""
        count, names = _non_finite_entries(self.model, self.criterion)
        if not count:
            return ""
        more = ", ..." if count > len(names) else ""
        return f"{count} weight/memory tensors are not finite (NaN or Inf): {', '.join(names)}{more}"

    def _raise_loss_diverged(self, epoch: int, step: int, total: Optional[int], bad_run: int) -> None:
        of = f" of {total}" if total else ""
        note = self._state_note()
        raise TrainingDiverged(
            f"training diverged at epoch {epoch + 1}, step {step}{of}: the loss was not finite (NaN or Inf) for "
            f"{bad_run} consecutive batches{'; ' if note else ''}{note}; {_ADVICE}{self._kept_checkpoint_note()}",
            epoch + 1, step)

    def check_finite_state(self, epoch: int, step: int = 0) -> None:
        """Raise :class:`TrainingDiverged` (naming ``epoch``, 1-based) when a floating-point parameter
        or buffer of the model or the criterion (class memory, BN statistics) holds a NaN or Inf."""
        note = self._state_note()
        if note:
            raise TrainingDiverged(f"training diverged in epoch {epoch}: {note}; {_ADVICE}; this state is not "
                                   f"saved{self._kept_checkpoint_note()}", epoch, step)

    def end_epoch(self, epochs: int) -> int:
        """Where the run ends: ``epochs``, or earlier when the schedule set ``final_epochs``."""
        final = getattr(self.scheduler, "final_epochs", None)
        return int(epochs) if final is None else min(int(epochs), int(final))

    def fit(self, loader: Any, epochs: int) -> List[Dict[str, float]]:
        """Train from the current epoch up to ``epochs``; checkpoint after each. Returns the history.

        Raises :class:`TrainingDiverged` when the loss stays non-finite or the weights become non-finite;
        the checkpoint of the last good epoch is then left as it was."""
        while self.epoch < self.end_epoch(epochs):
            stats = self.train_epoch(loader, self.epoch, self.end_epoch(epochs))
            self.check_finite_state(self.epoch + 1, stats["batches"])
            note = ""
            if self.scheduler is not None and getattr(self.scheduler, "needs_loss", False):
                if self.scheduler.step(stats["loss"]):
                    s = self.scheduler
                    note = (f"; loss below {s.factor:g} x epoch {s.base_epoch}'s {s.base_loss:.4f}: learning rate "
                            f"x{s.gamma:g}, the run ends after epoch {self.end_epoch(epochs)}")
            elif self.scheduler is not None:
                self.scheduler.step()
            self.epoch += 1
            self.history.append(stats)
            lr = ", ".join(f"{x:g}" for x in stats["lr"])
            skipped = (f", {stats['skipped_batches']} of {stats['batches']} batches skipped (loss not finite)"
                       if stats["skipped_batches"] else "")
            self.log(f"epoch {self.epoch}/{epochs}: loss {stats['loss']:.4f}, acc {100 * stats['acc']:.1f}%, "
                     f"lr [{lr}], {stats['time']:.1f} s{skipped}{note}")
            if self.checkpoint_path:
                state = self.state_dict() if self.dist is None else self.dist.checkpoint_state(self.state_dict())
                if state is not None:  # across processes: the main rank writes, with every rank's RNG states
                    save_checkpoint(state, self.checkpoint_path)  # state checked above
        return self.history

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly (tensors and plain containers only)."""
        matcher = getattr(self.criterion, "matcher", None)
        return {
            "format": FORMAT,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "head": matcher.state_dict() if isinstance(matcher, nn.Module) else None,
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng_state(self.loader_generator),
            "config": self.config,
            "history": [dict(h) for h in self.history],
            "sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
        }

    def load_state_dict(self, ckpt: Dict[str, Any], restore_rng: bool = True) -> None:
        """Restore from :meth:`state_dict` output."""
        self.model.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.sampler is not None and ckpt.get("sampler") is not None:
            self.sampler.load_state_dict(ckpt["sampler"])
        self.epoch = int(ckpt["epoch"])
        self.history = [dict(h) for h in ckpt.get("history", [])]
        rng = ckpt.get("rng")
        if self.dist is not None:
            rng = self.dist.rank_rng_state(ckpt, rng)
        if restore_rng and rng is not None:
            restore_rng_state(rng, self.loader_generator)

    def save(self, path: Optional[str] = None) -> str:
        """Write a checkpoint atomically (default: :attr:`checkpoint_path`). A state with NaN or Inf
        weights is refused (:class:`TrainingDiverged`), so it never replaces a good checkpoint."""
        path = path or self.checkpoint_path
        if not path:
            raise ValueError("no checkpoint path: give one or set checkpoint_dir")
        self.check_finite_state(self.epoch)
        return save_checkpoint(self.state_dict(), path)

    def resume(self, path: str) -> int:
        """Load a checkpoint (file or folder holding the checkpoint); returns the epochs completed.

        When the trainer has a config (:func:`run_training` gives it one), the run's settings must agree
        with the checkpoint's as ``qaconv train --resume`` requires (:func:`~qaconv_ext.engine.resume.settle_resume`:
        the same settings; more epochs than done, unless the run is not complete yet); else
        :class:`~qaconv_ext.engine.resume.ResumeConflict` names what differs.
        """
        if os.path.isdir(path):
            path = os.path.join(path, self.checkpoint_name)
        ckpt = load_checkpoint(path, map_location=self.device)
        given = {k: self.config[k] for k in (*RUN_OPTIONS, "dataset", "combine_all") if k in self.config}
        if given:
            settle_resume(saved_settings(ckpt.get("config")), int(ckpt.get("epoch", 0)),
                          {**given, "dataset": given.get("dataset") or None}, run=path, scheduler=ckpt.get("scheduler"))
        self.load_state_dict(ckpt)
        return self.epoch


def run_training(cfg: TrainConfig, train_records: Sequence[Any], num_classes: int, *,
                 checkpoint_dir: Optional[str] = None, checkpoint_name: str = CHECKPOINT_NAME,
                 resume: Optional[str] = None, extra_config: Optional[Dict[str, Any]] = None,
                 progress: bool = True, log: Callable[[str], None] = print, dist: Optional[Any] = None) -> Trainer:
    """Build everything from ``cfg`` and train to ``cfg.epochs``; returns the trainer.

    ``resume``: a checkpoint file or folder to continue from (exactly). ``extra_config`` entries are
    stored next to the config in checkpoints (e.g. dataset paths for the picture commands).
    ``dist``: train across processes (:class:`qaconv_ext.distributed.DistributedTraining`; ``cfg.batch_size``
    is then the global batch, split across the ranks).
    """
    seed_everything(cfg.seed)
    backbone, criterion = build_model(cfg, num_classes)
    generator = torch.Generator()
    generator.manual_seed(int(cfg.seed))
    sampler = None
    if cfg.recipe == "gs":
        sampler = build_graph_sampler(train_records, cfg, backbone, criterion.matcher,
                                      progress=progress and (dist is None or dist.is_main))
        if dist is not None:   # every rank samples from the main rank's distances
            sampler.distance_fn = dist.from_main(sampler.distance_fn)
    loader = build_train_loader(train_records, cfg, generator, sampler=sampler)
    if dist is not None:
        loader = dist.shard_loader(loader, cfg.batch_size, generator)  # this rank's part of each batch
        dist.seed_rank(cfg.seed)  # the same model everywhere; augmentations drawn per rank
    optimizer = build_optimizer(backbone, criterion, cfg.lr, cfg.trunk_lr_mult, cfg.momentum, cfg.weight_decay,
                                cfg.nesterov)
    scheduler: Any = (LossDropSchedule(optimizer, cfg.step_factor, cfg.gamma) if cfg.recipe == "gs"
                      else build_scheduler(optimizer, cfg.step_size, cfg.gamma))
    config = cfg.to_dict()
    config.update({"backbone": cfg.arch, "num_classes": int(num_classes)})
    config.update(extra_config or {})
    if dist is not None:
        config.update(world_size=int(dist.world_size), sync_bn=bool(dist.sync_bn))
    if cfg.method == "qaconv":
        m = criterion.matcher
        config.update(feature_height=m.height, feature_width=m.width, num_features=m.num_features)
    trainer = Trainer(backbone, criterion, optimizer, scheduler, device=cfg.device, amp=cfg.amp,
                      clip_grad=cfg.clip_grad, freeze_bn=cfg.freeze_bn, loader_generator=generator,
                      checkpoint_dir=checkpoint_dir, checkpoint_name=checkpoint_name, config=config,
                      progress=progress, log=log, dist=dist, sampler=sampler)
    if resume:
        done = trainer.resume(resume)
        log(f"resumed from {resume} after epoch {done}")
    trainer.fit(loader, cfg.epochs)
    return trainer
