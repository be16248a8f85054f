"""Continuing a run: reconciling the settings a run was started with (its checkpoint's config) with the
ones given again. ``qaconv train --resume``, :meth:`~qaconv_ext.engine.Trainer.resume` and
:func:`~qaconv_ext.engine.run_training` apply the same rule (:func:`settle_resume`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config import LEGACY_PRESET, RUN_OPTIONS, TrainConfig

__all__ = ["RUN_OPTIONS", "ResumeConflict", "saved_settings", "new_run_settings", "settle_resume"]

#: What a checkpoint that lacks a setting was trained with (it predates the option).
_LEGACY = {"preprocess": LEGACY_PRESET}

#: How a setting is named in messages when that is not simply ``--<name>``.
_LABELS = {"random_block": "Random Block (--no-random-block)", "flip": "flips (--no-flip)",
           "freeze_bn": "frozen BatchNorms (--freeze-bn/--no-freeze-bn)", "amp": "mixed precision (--amp/--no-amp)"}


class ResumeConflict(ValueError):
    """The settings given to continue a run do not fit it (one line: what differs, or why not)."""


def saved_settings(config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A checkpoint's config with the settings it predates filled in as it was trained."""
    return {**_LEGACY, **dict(config or {})}


def new_run_settings(recipe: Optional[str] = None) -> Dict[str, Any]:
    """The :data:`RUN_OPTIONS` of a new run of ``recipe`` (default ``eccv``)."""
    cfg = TrainConfig.for_recipe(recipe or "eccv")
    return {k: getattr(cfg, k) for k in RUN_OPTIONS}


def _show(key: str, value: Any) -> str:
    """A setting's value as a message shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return {"amp": "auto", "pretrained": "none", "base_lr_mult": "auto"}.get(key, "none")
    if key == "ibn" and value == "none":
        return "none"
    return str(value)


def _as_option(key: str, value: Any, recipe: str = "eccv") -> Optional[str]:
    """The command-line words that give ``key`` the value ``value`` (None when nothing needs giving)."""
    if key in ("random_block", "flip"):
        return None if value else f"--no-{key.replace('_', '-')}"
    if key == "freeze_bn":
        return "--freeze-bn" if value else ("--no-freeze-bn" if recipe == "gs" else None)
    if key == "amp":
        return None if value is None else ("--amp" if value else "--no-amp")
    if key == "ibn":
        return f"--ibn {value or 'none'}"
    if value is None:
        return None
    return f"--{key.replace('_', '-')} {value}"


def _agrees(key: str, given: Any, saved: Any, saved_config: Dict[str, Any]) -> bool:
    if key == "ibn":   # a plain trunk is a setting too: None in the config, "none" on the command line
        return (given or "none") == (saved or "none")
    if key == "pretrained" and given is not None and saved is not None:
        return os.path.abspath(given) == os.path.abspath(saved)
    if key == "base_lr_mult" and saved is None:   # compare with the multiplier the run used
        return float(given) == (0.1 if saved_config.get("pretrained") else 1.0)
    if isinstance(given, float) or isinstance(saved, float):
        return saved is not None and float(given) == float(saved)
    return given == saved


def settle_resume(saved: Mapping[str, Any], done: int, given: Mapping[str, Any], *, run: str,
                  scheduler: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The settings of a resumed run and the lines that say what was adopted or changed.

    ``saved``: the checkpoint's config (:func:`saved_settings`); ``done``: the epochs it completed;
    ``given``: values for :data:`RUN_OPTIONS` and ``dataset``, ``combine_all`` (None: not given);
    ``run``: how messages name the checkpoint. Every setting takes the checkpoint's value; a given value
    that differs from it raises :class:`ResumeConflict` listing the differences (setting: checkpoint vs
    given). The one change allowed is ``epochs``: more than the epochs done moves the run's end (and says
    so); not more is refused, and without ``epochs`` a complete run is refused too (also a ``gs`` run
    whose schedule has ended it).
    """
    defaults = new_run_settings(saved.get("recipe", "eccv"))
    settled: Dict[str, Any] = {}
    conflicts, adopted = [], []
    for key in RUN_OPTIONS:
        if key == "epochs":
            continue
        value, old = given.get(key), saved.get(key, defaults[key])
        if value is not None and not _agrees(key, value, old, dict(saved)):
            conflicts.append(f"{_LABELS.get(key, '--' + key.replace('_', '-'))}: {_show(key, old)} in the "
                             f"checkpoint, {_show(key, value)} given")
            continue
        settled[key] = old
        if value is None and key in saved:
            words = _as_option(key, old, saved.get("recipe", "eccv"))
            if words:
                adopted.append(words)
    old_dataset = saved.get("dataset") or None
    dataset = given.get("dataset") or None
    if dataset is not None and old_dataset is not None and dataset != old_dataset:
        conflicts.append(f"--dataset: {old_dataset} in the checkpoint, {dataset} given")
    combine_all = given.get("combine_all")
    if "combine_all" in saved and combine_all is not None and bool(combine_all) != bool(saved["combine_all"]):
        conflicts.append(f"--combine-all: {_show('', bool(saved['combine_all']))} in the checkpoint, "
                         f"{_show('', bool(combine_all))} given")
    if conflicts:
        raise ResumeConflict(f"--resume continues {run} with the settings it was started with, and these differ: "
                             f"{'; '.join(conflicts)}; drop them, or start a new run")
    settled["dataset"] = dataset or old_dataset
    settled["combine_all"] = bool(saved.get("combine_all", False) if combine_all is None else combine_all)

    planned = int(saved.get("epochs", defaults["epochs"]))
    notes = [f"from the checkpoint: {' '.join(adopted)}"] if adopted else []
    final = (scheduler or {}).get("final_epochs")
    if final is not None and done >= int(final):
        raise ResumeConflict(f"--resume: {run} is complete: the gs schedule lowered the learning rate after epoch "
                             f"{(scheduler or {}).get('stepped_at')} and ended the run after epoch {final}; start a "
                             "new run to train more")
    epochs = given.get("epochs")
    if epochs is None:
        if done >= planned:
            raise ResumeConflict(f"--resume: {run} is complete ({done} of {planned} epochs); give --epochs N (more "
                                 f"than {done}) to extend the run")
        epochs = planned
    elif epochs <= done:
        raise ResumeConflict(f"--epochs {epochs}: the run in {run} has already done {done} "
                             f"epoch{'s' if done != 1 else ''}; give more than {done} to extend it")
    elif epochs != planned:
        change = "extends" if epochs > planned else "shortens"
        notes.append(f"--epochs {epochs} {change} the run: it was started for {planned} epochs and now ends "
                     f"after {epochs} (the one setting a resumed run may change)")
    settled["epochs"] = epochs
    return settled, notes
