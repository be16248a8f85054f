"""The identity of the model that made an index's maps: checkpoint hash, preprocessing, map shape and
the folded head, as plain JSON; and the checks that a given head or checkpoint is that model."""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from ..config import preset_of
from ..data import build_test_transform
from ..ops.dtypes import score_weights
from .storage import GalleryIndexError

__all__ = ["checkpoint_sha256", "fold_head", "model_identity", "describe_model", "head_matches",
           "preprocessing_of", "check_checkpoint", "check_head", "check_preprocessing"]

HeadLike = Union[torch.nn.Module, Tuple[Any, Any]]


def checkpoint_sha256(path: str, block: int = 1 << 22) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(block)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def fold_head(head: HeadLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weight [2L], bias [])`` as float32 CPU tensors, from a head with ``folded()`` (e.g.
    :class:`qaconv_ext.QAConv`, folded in eval mode) or a ``(weight, bias)`` pair."""
    if hasattr(head, "folded"):
        with torch.no_grad():
            w, b = head.folded()
    elif isinstance(head, (tuple, list)) and len(head) == 2:
        w, b = head
    else:
        raise TypeError(f"head: expected a QAConv head (with .folded()) or a (weight, bias) pair, "
                        f"got {type(head).__name__}")
    w, b = score_weights(w, b, torch.float32, "cpu")
    return w.detach(), b.detach()


def preprocessing_of(height: int, width: int, preprocess: str) -> str:
    """How query and gallery images are turned into model input with the input preset ``preprocess``
    (the test transform, as text)."""
    return repr(build_test_transform(int(height), int(width), preprocess))


def model_identity(head: HeadLike, map_shape: Sequence[int], *, checkpoint: Optional[str] = None,
                   config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``"model"`` entry of a manifest: the folded head (weight and bias as exact float32 values),
    the map shape, and when known the checkpoint (path and SHA-256), backbone, input size, input preset
    and preprocessing (the preset of ``config``, a model's config as :func:`qaconv_ext.engine.load_trained`
    returns it)."""
    w, b = fold_head(head)
    L = int(map_shape[1]) * int(map_shape[2])
    if w.numel() != 2 * L:
        raise ValueError(f"head: {w.numel()} folded weights, {list(map_shape)} maps need {2 * L}")
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("head: its folded weights or bias are not finite (NaN or Inf), so every score would be")
    ident: Dict[str, Any] = {
        "map_shape": [int(x) for x in map_shape],
        "head": {"layout": getattr(head, "layout", None), "weight": [float(x) for x in w.tolist()],
                 "bias": float(b)},
        "checkpoint": None,
    }
    if checkpoint is not None:
        path = os.path.abspath(checkpoint)
        ident["checkpoint"] = {"path": path, "sha256": checkpoint_sha256(path)}
    if config:
        h, w_ = int(config["height"]), int(config["width"])
        preset = preset_of(config)
        ident.update(arch=config.get("arch"), input_size=[h, w_], preprocess=preset,
                     preprocessing=preprocessing_of(h, w_, preset))
    return ident


def describe_model(ident: Dict[str, Any]) -> str:
    """A short name of the model an identity describes (checkpoint path and hash, or the head)."""
    ck = ident.get("checkpoint")
    if ck:
        return f"checkpoint {ck['path']} (sha256 {ck['sha256'][:12]})"
    return f"a QAConv head given with its maps ({ident['map_shape'][0]} x {ident['map_shape'][1]} x " \
           f"{ident['map_shape'][2]}, no checkpoint)"


def head_matches(ident: Dict[str, Any], head: HeadLike) -> bool:
    """Whether ``head`` folds to the weights and bias of the identity (to float32 rounding)."""
    w, b = fold_head(head)
    sw = torch.tensor(ident["head"]["weight"], dtype=torch.float32)
    sb = torch.tensor(ident["head"]["bias"], dtype=torch.float32)
    return (w.shape == sw.shape and bool(torch.allclose(w, sw, rtol=1e-5, atol=1e-6))
            and bool(torch.allclose(b, sb, rtol=1e-5, atol=1e-6)))


def check_head(folder: str, ident: Dict[str, Any], head: HeadLike) -> None:
    """Raise :class:`GalleryIndexError` unless ``head`` is the index's head."""
    if not head_matches(ident, head):
        raise GalleryIndexError(f"{folder} was made with another model: {describe_model(ident)}; "
                                "the given head's folded weights differ")


def check_checkpoint(folder: str, ident: Dict[str, Any], checkpoint: str) -> str:
    """Raise :class:`GalleryIndexError` unless the file ``checkpoint`` is the index's checkpoint
    (same SHA-256); returns the hash. An index made without a checkpoint accepts any file here (the
    caller then compares the heads)."""
    if not os.path.isfile(checkpoint):
        raise GalleryIndexError(f"checkpoint not found: {checkpoint}")
    digest = checkpoint_sha256(checkpoint)
    ck = ident.get("checkpoint")
    if ck and ck["sha256"] != digest:
        raise GalleryIndexError(f"{folder} was made with {describe_model(ident)}, not with {checkpoint} "
                                f"(sha256 {digest[:12]})")
    return digest


def check_preprocessing(folder: str, ident: Dict[str, Any], config: Dict[str, Any], what: str) -> None:
    """Raise :class:`GalleryIndexError` unless the model of ``config`` (``what`` names it) turns images into
    input as the index's model did (input preset and size)."""
    recorded = ident.get("preprocessing")
    if recorded is None:
        return
    preset = preset_of(config)
    mine = preprocessing_of(int(config["height"]), int(config["width"]), preset)
    if mine != recorded:
        made = ident.get("preprocess")
        raise GalleryIndexError(f"{folder} was made with the {made + ' input preset, ' if made else ''}"
                                f"preprocessing {recorded}; {what} uses the {preset} preset, {mine}")
