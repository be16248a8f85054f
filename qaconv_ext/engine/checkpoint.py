"""Checkpoints: atomic writes, ``weights_only`` loading, RNG states, public QAConv checkpoints.

A training checkpoint is a dict of tensors and plain Python containers only, so
``torch.load(path, weights_only=True)`` reads it. Layout (what :class:`~qaconv_ext.engine.Trainer`
writes)::

    {"format": "qaconv-ext/1", "epoch": int (epochs completed),
     "model": backbone state, "head": QAConv head state (qaconv runs), "criterion": loss state
     (class memory, head, or classifier), "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "rng": {...}, "config": TrainConfig dict, "history": [per-epoch dicts]}
"""
from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import zipfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..utils.torch_files import TorchFileError, load_torch_file

__all__ = [
    "CHECKPOINT_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "load_public_qaconv",
    "find_checkpoint",
    "load_trained",
    "CheckpointError",
    "missing_checkpoint_message",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "qaconv-ext/1"


def _temporary_name_pattern(base: str) -> "re.Pattern[str]":
    """Names of the temporary files :func:`save_checkpoint` writes next to ``base``:
    ``.<base>.<8 random characters>.tmp``."""
    return re.compile(r"\." + re.escape(base) + r"\.[a-z0-9_]{8}\.tmp\Z")


def _remove_stale_temporaries(folder: str, base: str) -> None:
    """Delete temporary files left in ``folder`` by saves of ``base`` that were killed mid-write."""
    pattern = _temporary_name_pattern(base)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if pattern.match(name):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _create_temporary(folder: str, base: str) -> Tuple[int, str]:
    """A new, exclusively created temporary file next to ``base``. Unlike ``tempfile.mkstemp`` (mode
    0600) it gets the usual mode, 0666 less the process umask, which ``os.replace`` then carries over."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name for {os.path.join(folder, base)}")


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    An interrupted or failing save leaves the previous file at ``path`` untouched and removes its
    temporary file; temporary files of ``path`` that a killed process left behind
    (``.<name>.<random>.tmp``) are deleted at the next save. The file gets the usual mode (0666 less
    the umask). Returns ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(folder, base)
    fd, tmp = _create_temporary(folder, base)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable where the platform allows it
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


class CheckpointError(TorchFileError):
    """A checkpoint that is missing or cannot be turned into a model (the message says why)."""


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    ``mmap``: map the tensors instead of reading them (zip-format files; for a quick look at the
    config). Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for a file
    that is not a PyTorch checkpoint or cannot be read safely; the messages name the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_checkpoint_message(path))
    try:
        ckpt = load_torch_file(path, map_location=map_location, mmap=mmap)
    except TorchFileError as exc:
        raise CheckpointError(str(exc)) from exc.__cause__
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def missing_checkpoint_message(path: str) -> str:
    """Why ``path`` gives no checkpoint: a folder without ``checkpoint.pt`` (naming the ``*.pt`` files
    it holds), or a missing file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return f"checkpoint not found: {path}"
    held = sorted(f for f in os.listdir(path) if f.endswith(".pt") and os.path.isfile(os.path.join(path, f)))
    if not held:
        return f"{path} has no {CHECKPOINT_NAME} (and no other *.pt file)"
    return f"{path} has no {CHECKPOINT_NAME}; it holds {', '.join(held)} (give one of these files)"


def find_checkpoint(path: str) -> Optional[str]:
    """``path`` itself when it is a file, ``path/checkpoint.pt`` when that exists, else None."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    cand = os.path.join(path, CHECKPOINT_NAME)
    return cand if os.path.isfile(cand) else None


def capture_rng_state(loader_generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Python, NumPy, torch (CPU and every CUDA device) and data-loader generator states, as tensors
    and plain containers."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    return state


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng_state(state: Dict[str, Any], loader_generator: Optional[torch.Generator] = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    if state.get("python") is not None:
        random.setstate(_as_tuple(state["python"]))
    npst = state.get("numpy")
    if npst is not None:
        np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                             npst["has_gauss"], npst["cached_gaussian"]))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda[:torch.cuda.device_count()]])
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"].cpu())


def load_public_qaconv(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(backbone_state, head_state)`` from a checkpoint of the public QAConv code.

    Handles ``{"model": ..., "criterion": ...}`` with the head under ``criterion`` (``matcher.*``
    in v1.3+, top-level ``bn``/``fc``/``logit_bn`` in the ECCV-era ``QAConvLoss``) and this
    package's own checkpoints (``"model"``/``"head"``). Build the head with
    :meth:`qaconv_ext.QAConv.from_state_dict` (it infers the layout from the FC size).
    """
    from ..head import extract_head_state

    ckpt = load_checkpoint(path)
    model = ckpt.get("model") or ckpt.get("state_dict")
    if model is None:
        raise KeyError(f"{path}: no backbone state ('model' or 'state_dict'); keys: {sorted(ckpt)}")
    model = {k[len("module."):] if k.startswith("module.") else k: v for k, v in model.items()}
    head = ckpt.get("head")
    if head is None:
        crit = ckpt.get("criterion")
        if crit is None:
            raise KeyError(f"{path}: no QAConv head ('head' or 'criterion'); keys: {sorted(ckpt)}")
        try:
            head = extract_head_state(crit)
        except KeyError:
            raise KeyError(f"{path}: 'criterion' holds no QAConv head (no fc.weight); "
                           f"keys: {sorted(crit)[:8]}") from None
    return model, head


def load_trained(path: str, *, arch: Optional[str] = None, neck: Optional[int] = None,
                 height: Optional[int] = None, width: Optional[int] = None, layout: Optional[str] = None,
                 device: Any = "cpu") -> Tuple[torch.nn.Module, Optional[torch.nn.Module], Dict[str, Any]]:
    """``(backbone, head or None, config)`` in eval mode from a checkpoint file or folder.

    Reads this package's checkpoints (the config inside names the backbone and the input size) and
    those of the public QAConv code (give ``arch``, ``height``, ``width``; the neck width and the
    head layout are inferred). Arguments that are not None override the checkpoint's config.
    ``head`` is None for baseline checkpoints. The returned config has ``arch``, ``neck``,
    ``height``, ``width``, ``checkpoint`` and, for QAConv, ``layout``, ``feature_height``,
    ``feature_width``. Raises :class:`CheckpointError` naming the problem.
    """
    from ..head import QAConv
    from ..models import build_backbone, feature_map_size

    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(missing_checkpoint_message(path))
    try:
        ckpt = load_checkpoint(found)
        cfg = dict(ckpt.get("config") or {})
        if cfg.get("method", "qaconv") == "baseline":
            model_state, head_state = ckpt["model"], None
        else:
            model_state, head_state = load_public_qaconv(found)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(str(exc).strip("'\"")) from None
    for key, val in (("arch", arch), ("neck", neck), ("height", height), ("width", width), ("layout", layout)):
        if val is not None:
            cfg[key] = val
    if "neck_conv.weight" in model_state and neck is None:
        cfg["neck"] = int(model_state["neck_conv.weight"].shape[0])
    cfg.setdefault("arch", cfg.get("backbone", "resnet50"))
    cfg.setdefault("neck", 128)
    cfg.setdefault("height", 384)
    cfg.setdefault("width", 128)
    backbone = build_backbone(cfg["arch"], neck=int(cfg["neck"]))
    try:
        backbone.load_state_dict(model_state)
    except RuntimeError as exc:
        raise CheckpointError(f"{found}: the backbone does not match arch {cfg['arch']!r}: {exc}") from None
    backbone.eval()
    head = None
    if head_state is not None:
        d, h, w = feature_map_size(backbone, int(cfg["height"]), int(cfg["width"]))
        try:
            head = QAConv.from_state_dict(head_state, d, h, w, layout=layout)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{found}: cannot build the QAConv head for {h}x{w} maps "
                                  f"(check the input height and width): {exc}") from None
        cfg.update(layout=head.layout, feature_height=h, feature_width=w)
        head = head.to(device).eval()
    cfg["checkpoint"] = found
    return backbone.to(device), head, cfg
