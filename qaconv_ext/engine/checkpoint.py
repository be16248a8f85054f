"""Checkpoints: atomic writes, ``weights_only`` loading, RNG states, public QAConv checkpoints.

Checkpoints of the public QAConv code (``checkpoint.pth.tar``, every version from the ECCV 2020
release to QAConv 2.x) are ``{"model": backbone state, "criterion": loss state (holding the head),
"optim": ..., "epoch": ...}`` (v2.1+ adds ``final_epochs``, ``base_loss``, ``lr_stepped``);
:func:`load_trained` infers the backbone from the names and shapes of the model state
(:func:`infer_backbone`).

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
import random
import re
import secrets
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..config import check_preset, preset_of
from ..head import QAConv, extract_head_state
from ..models import RESNET_SPECS, build_backbone, feature_map_size, trunk_ibn_type
from ..models.resnet import Bottleneck
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
    "TrainedModel",
    "CheckpointError",
    "missing_checkpoint_message",
    "infer_backbone",
    "PUBLIC_CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: The file name the public QAConv code writes; ``find_checkpoint`` looks for it too.
PUBLIC_CHECKPOINT_NAME = "checkpoint.pth.tar"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".tar")
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
    """Why ``path`` gives no checkpoint: a folder without ``checkpoint.pt`` or ``checkpoint.pth.tar``
    (naming the ``*.pt``/``*.pth``/``*.tar`` files it holds), or a missing file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return f"checkpoint not found: {path}"
    held = sorted(f for f in os.listdir(path)
                  if f.endswith(_CHECKPOINT_SUFFIXES) and os.path.isfile(os.path.join(path, f)))
    if not held:
        return f"{path} has no {CHECKPOINT_NAME} or {PUBLIC_CHECKPOINT_NAME} (and no other checkpoint file)"
    return f"{path} has no {CHECKPOINT_NAME}; it holds {', '.join(held)} (give one of these files)"


def find_checkpoint(path: str) -> Optional[str]:
    """``path`` itself when it is a file; in a folder ``checkpoint.pt`` (this package's) or else
    ``checkpoint.pth.tar`` (the public QAConv code's); else None."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    for name in (CHECKPOINT_NAME, PUBLIC_CHECKPOINT_NAME):
        cand = os.path.join(path, name)
        if os.path.isfile(cand):
            return cand
    return None


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


def _stage_counts(trunk: Dict[str, Any]) -> List[int]:
    """Blocks per stage (``layer1``, ``layer2``, ...) of a trunk state, up to the first missing stage."""
    counts = []
    for i in range(1, 5):
        idx = {k.split(".")[1] for k in trunk if k.startswith(f"layer{i}.")}
        idx = {int(x) for x in idx if x.isdigit()}
        if not idx:
            break
        counts.append(max(idx) + 1)
    return counts


def infer_backbone(model_state: Dict[str, Any]) -> Dict[str, Any]:
    """The backbone a QAConv model state (``base.*``, ``neck_conv.*``, ``neck_bn.*``) was saved from.

    Returns ``{"arch", "ibn", "neck", "neck_type", "neck_kernel", "final_layer"}``: the ResNet depth from
    the block type and the blocks per stage, the IBN-Net variant from the key names (``bn1.IN``: a,
    ``IN``/an InstanceNorm stem: b), the neck from ``neck_conv`` (with bias: ``"bias"``, with
    ``neck_bn``: ``"bn"``), the last stage from the neck's input channels. Raises
    :class:`CheckpointError` naming what matches no supported backbone.
    """

    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in model_state.items()}
    trunk = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
    if not trunk:
        raise CheckpointError("the model state has no trunk (no base.* entries): not a QAConv ResNet backbone")
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in trunk)
    counts = _stage_counts(trunk)
    stem = tuple(trunk["conv1.weight"].shape)[0] if "conv1.weight" in trunk else None
    kind = "bottleneck" if bottleneck else "basic"
    matches = []
    for name, spec in RESNET_SPECS.items():
        layers = tuple(spec["layers"])
        if (spec["block"] is Bottleneck) == bottleneck and len(counts) >= 2 and tuple(counts) == layers[:len(counts)] \
                and stem == spec.get("stem_width", 64):
            matches.append(name)
    if len(matches) != 1:
        known = ", ".join(f"{n} {tuple(s['layers'])}" for n, s in RESNET_SPECS.items())
        raise CheckpointError(f"unsupported backbone: {kind} blocks per stage {tuple(counts)} with a {stem}-channel "
                              f"stem match no supported architecture ({known})")
    arch = matches[0]
    try:
        ibn = trunk_ibn_type(trunk)
    except ValueError as exc:
        raise CheckpointError(f"unsupported backbone: {exc}") from None
    spec = RESNET_SPECS[arch]
    expansion = 4 if bottleneck else 1
    widths = spec.get("widths", (64, 128, 256, 512))
    stage_channels = {f"layer{i + 1}": w * expansion for i, w in enumerate(widths)}
    out: Dict[str, Any] = {"arch": arch, "ibn": ibn, "neck": 0, "neck_type": "bn", "neck_kernel": 3,
                           "final_layer": f"layer{min(len(counts), 3)}"}
    conv = state.get("neck_conv.weight")
    if conv is not None:
        has_bias = "neck_conv.bias" in state
        has_bn = any(k.startswith("neck_bn.") for k in state)
        if has_bias == has_bn:
            raise CheckpointError("unsupported neck: neck_conv " + ("with a bias and neck_bn" if has_bias else
                                                                    "without a bias and without neck_bn"))
        in_ch = int(conv.shape[1])
        final = [layer for layer, c in stage_channels.items() if c == in_ch and int(layer[5:]) <= len(counts)]
        if not final:
            raise CheckpointError(f"unsupported neck: neck_conv takes {in_ch} channels, no stage of {arch} has that many")
        out.update(neck=int(conv.shape[0]), neck_type="bias" if has_bias else "bn", neck_kernel=int(conv.shape[-1]),
                   final_layer=final[0])
    return out


def _check_backbone_state(backbone: torch.nn.Module, state: Dict[str, Any], what: str) -> Dict[str, Any]:
    """``state`` ready for a strict load into ``backbone`` (``module.`` stripped, stages the trunk does not
    build dropped, missing BatchNorm counters filled), or :class:`CheckpointError` in one line."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    children = {name for name, _ in backbone.base.named_children()} if hasattr(backbone, "base") else set()
    state = {k: v for k, v in state.items()
             if not (k.startswith("base.") and k.split(".")[1] not in children)}
    own = backbone.state_dict()
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} entries missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected entries (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shapes differ (e.g. {k}: {tuple(state[k].shape)} in the checkpoint, "
                        f"{tuple(own[k].shape)} in {what})")
    if problems:
        raise CheckpointError(f"the backbone state does not fit {what}: " + "; ".join(problems))
    return state


def _public_version(ckpt: Dict[str, Any], neck_type: str) -> str:
    """Which public QAConv release wrote a checkpoint, from its neck and its criterion's layout."""
    if neck_type == "bias":
        return "v2.1+"
    crit = ckpt.get("criterion") or {}
    return "v1.2-v2.0" if any(str(k).startswith("matcher.") for k in crit) else "v1.0-v1.1"


class TrainedModel(NamedTuple):
    """What :func:`load_trained` returns: ``backbone, head, config = load_trained(path)`` unpacks it."""

    backbone: torch.nn.Module
    head: Optional[torch.nn.Module]
    config: Dict[str, Any]

    @property
    def preprocess(self) -> str:
        """The input preset the model was trained with (extract its features with this one)."""
        return self.config["preprocess"]


def load_trained(path: str, *, arch: Optional[str] = None, neck: Optional[int] = None,
                 height: Optional[int] = None, width: Optional[int] = None, layout: Optional[str] = None,
                 device: Any = "cpu", ibn: Optional[str] = None, neck_type: Optional[str] = None,
                 preprocess: Optional[str] = None) -> "TrainedModel":
    """``(backbone, head or None, config)`` in eval mode from a checkpoint file or folder, as a
    :class:`TrainedModel` (``.preprocess``: the input preset to extract features with).

    Reads this package's checkpoints and those of the public QAConv code (every version, plain ResNet
    or IBN-Net, BatchNorm or bias neck). The backbone -- ResNet depth, IBN-Net variant, neck width and
    type, last stage -- is inferred from the weights (:func:`infer_backbone`); the input size comes
    from this package's config, else 384 x 128 (give ``height``/``width`` for public models trained at
    another size). Arguments that are not None override what was read or inferred (``ibn="none"``
    forces a plain ResNet). ``head`` is None for baseline checkpoints.

    The returned config has ``arch``, ``ibn``, ``neck``, ``neck_type``, ``final_layer``, ``height``,
    ``width``, ``preprocess`` (the input preset: the checkpoint's own, else the rule of
    :func:`qaconv_ext.config.preset_of`), ``source`` (``"qaconv-ext"`` or ``"public"``; ``public_version`` for the latter),
    ``checkpoint`` and, for QAConv, ``layout``, ``feature_height``, ``feature_width``. Raises :class:`CheckpointError` (one line) naming
    what does not fit.
    """
    if preprocess is not None:
        check_preset(preprocess)
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(missing_checkpoint_message(path))
    try:
        ckpt = load_checkpoint(found)
        if "model" not in ckpt and "state_dict" not in ckpt:
            shown = ", ".join(str(k) for k in list(ckpt)[:4]) + (", ..." if len(ckpt) > 4 else "")
            raise CheckpointError(f"{found} is not a QAConv training checkpoint: it has no 'model' entry "
                                  f"(it holds {shown})")
        own_format = ckpt.get("format") == FORMAT or isinstance(ckpt.get("config"), dict)
        cfg = dict(ckpt.get("config") or {})
        if cfg.get("method", "qaconv") == "baseline":
            model_state, head_state = ckpt["model"], None
        else:
            model_state, head_state = load_public_qaconv(found)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(str(exc).strip("'\"")) from None
    try:
        inferred = infer_backbone(model_state)
    except CheckpointError as exc:
        raise CheckpointError(f"{found}: {exc}") from None
    cfg.update(inferred)
    for key, val in (("arch", arch), ("neck", neck), ("height", height), ("width", width), ("layout", layout),
                     ("neck_type", neck_type), ("preprocess", preprocess)):
        if val is not None:
            cfg[key] = val
    if ibn is not None:
        cfg["ibn"] = None if str(ibn).lower() == "none" else ibn
    cfg.setdefault("height", 384)
    cfg.setdefault("width", 128)
    cfg["preprocess"] = preset_of(cfg, own_format)
    cfg["source"] = "qaconv-ext" if own_format else "public"
    if not own_format:
        cfg["public_version"] = _public_version(ckpt, cfg["neck_type"])
    what = cfg["arch"] + (f" (IBN-{cfg['ibn']})" if cfg["ibn"] else "") + f", {cfg['neck_type']} neck"
    try:
        backbone = build_backbone(cfg["arch"], neck=int(cfg["neck"]), ibn=cfg["ibn"], neck_type=cfg["neck_type"],
                                  final_layer=cfg["final_layer"], neck_kernel=int(cfg["neck_kernel"]))
        backbone.load_state_dict(_check_backbone_state(backbone, model_state, what))
    except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{found}: {str(exc).strip(chr(39))}") from None
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
    return TrainedModel(backbone.to(device), head, cfg)
