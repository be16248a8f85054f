"""QAConv's feature-map backbone: a ResNet/IBN-Net trunk, a neck convolution, channel-wise L2 norm.

Parameter names: ``base.*`` (the trunk, torchvision / IBN-Net names), ``neck_conv.*`` and, for the
BatchNorm neck, ``neck_bn.*`` -- the names of the public QAConv code, so its checkpoints load with
``strict=True`` (their ``base.layer4.*``/``base.fc.*`` entries, unused by a layer-3 trunk, are
dropped on load, and a ``module.`` prefix left by ``nn.DataParallel`` is stripped).

Two necks (:data:`NECK_TYPES`): ``"bn"`` -- a 3x3 convolution without bias followed by BatchNorm (the
public code v1.0-v2.0, the ECCV 2020 paper); ``"bias"`` -- a 3x3 convolution with bias and no
normalisation (the public code v2.1 and later, QAConv 2.x).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ARCHITECTURES, NECK_TYPES
from ..utils.torch_files import TorchFileError, load_torch_file
from .resnet import IBN_ARCHITECTURES, IBN_TYPES, resnet

__all__ = ["ReIDBackbone", "FeatureMapAdapter", "build_backbone", "load_pretrained", "feature_map_size",
           "ARCHITECTURES", "NECK_TYPES", "IBN_TYPES", "IBN_ARCHITECTURES", "trunk_ibn_type",
           "PretrainedWeightsError"]

#: Names accepted by :func:`build_backbone`.


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


class ReIDBackbone(nn.Module):
    """``base`` trunk -> ``neck_conv`` (``neck`` channels, 3x3 by default) [-> ``neck_bn``] -> L2 norm.

    ``forward(images [B, 3, H, W]) -> [B, num_features, H / stride, W / stride]``, unit norm over
    channels at every location. ``neck <= 0`` skips the neck (``num_features`` is then the trunk's
    channel count). ``neck_type``: ``"bn"`` (conv without bias + BatchNorm) or ``"bias"`` (conv with
    bias, no normalisation). The input preset the weights were trained with is not part of the module:
    a run's config records it and :func:`qaconv_ext.engine.load_trained` returns it with the model.
    """

    def __init__(self, base: nn.Module, base_channels: int, neck: int = 128, neck_kernel: int = 3,
                 normalize: bool = True, neck_type: str = "bn") -> None:
        super().__init__()
        if neck_type not in NECK_TYPES:
            raise ValueError(f"unknown neck_type {neck_type!r}; use one of {NECK_TYPES}")
        self.base = base
        self.neck = int(neck)
        self.neck_type = neck_type
        self.normalize = bool(normalize)
        if self.neck > 0:
            self.neck_conv = nn.Conv2d(base_channels, self.neck, kernel_size=neck_kernel,
                                       padding=neck_kernel // 2, bias=neck_type == "bias")
            if neck_type == "bn":
                self.neck_bn = nn.BatchNorm2d(self.neck)
            nn.init.kaiming_normal_(self.neck_conv.weight, mode="fan_out", nonlinearity="relu")
        self.num_features = self.neck if self.neck > 0 else int(base_channels)
        self.stride = int(getattr(base, "stride", 0)) or None
        self.register_load_state_dict_pre_hook(self._adapt_state_dict)

    def _adapt_state_dict(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        """Strip ``module.`` and drop trunk entries of layers this trunk does not build."""
        for key in [k for k in state_dict if k.startswith(prefix + "module.")]:
            state_dict[prefix + key[len(prefix) + len("module."):]] = state_dict.pop(key)
        children = {name for name, _ in self.base.named_children()}
        base_prefix = prefix + "base."
        for key in [k for k in state_dict if k.startswith(base_prefix)]:
            if key[len(base_prefix):].split(".", 1)[0] not in children:
                del state_dict[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.base(x)
        if torch.is_autocast_enabled(x.device.type):
            # Under mixed precision the trunk runs in low precision; the neck and the normalisation,
            # which make the features QAConv matches and the class memory stores, stay in float32.
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._head(x.float())
        return self._head(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.neck > 0:
            x = self.neck_conv(x)
            if self.neck_type == "bn":
                x = self.neck_bn(x)
        return F.normalize(x, dim=1) if self.normalize else x


class FeatureMapAdapter(nn.Module):
    """Use any module returning ``[B, d, h, w]`` as a QAConv backbone (adds the channel L2 norm).

    ``base`` is kept under that name, so the optimiser helpers treat it as the pretrained trunk.
    """

    def __init__(self, module: nn.Module, num_features: Optional[int] = None) -> None:
        super().__init__()
        self.base = module
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.base(x), dim=1)


class PretrainedWeightsError(ValueError):
    """A pretrained-weights file that cannot be used: not a PyTorch file, damaged, holding objects that
    safe loading refuses, or without the trunk's parameters (the one-line message names the file)."""


def _read_weights(path: str) -> Any:
    """The object saved in ``path``, read with ``torch.load(weights_only=True)``; one-line errors."""
    if os.path.isdir(path):
        raise PretrainedWeightsError(f"pretrained weights: {path} is a folder, not a weights file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path} (give a local file; nothing is downloaded)")
    try:
        state = load_torch_file(path, what="PyTorch checkpoint")
    except TorchFileError as exc:
        raise PretrainedWeightsError(f"pretrained weights: {exc}") from None
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"pretrained weights: {path}: expected a dict, got {type(state).__name__}")
    return state


def trunk_ibn_type(state: Mapping[str, Any]) -> Optional[str]:
    """The IBN-Net variant a trunk state dict (torchvision/IBN-Net names, no prefix) was saved from.

    ``"a"``: ``layerN.M.bn1.IN.*`` entries; ``"b"``: ``layerN.M.IN.*`` entries, or a stem ``bn1`` without
    running statistics (an InstanceNorm); None: a plain ResNet. Raises ``ValueError`` for both marks.
    """
    keys = list(state)
    has_a = any(".bn1.IN." in k for k in keys if k.startswith("layer"))
    has_b = any(k.split(".")[2:3] == ["IN"] for k in keys if k.startswith("layer")) or (
        "bn1.weight" in state and "bn1.running_mean" not in state)
    if has_a and has_b:
        raise ValueError("the state has both IBN-a (bn1.IN) and IBN-b (IN) layers")
    return "a" if has_a else ("b" if has_b else None)


def load_pretrained(backbone: ReIDBackbone, path: str) -> Dict[str, Any]:
    """Load ImageNet weights of the trunk from a local file (torchvision ResNet or IBN-Net naming).

    Accepts a plain state dict or one nested under ``state_dict``/``model``; ``module.``/``base.``
    prefixes are handled; ``fc.*`` and stages the trunk does not build are ignored. Every trunk
    parameter must be present. Nothing is downloaded. Returns ``{"loaded": n, "ignored": [...]}``.

    Raises ``FileNotFoundError`` for a missing file and :class:`PretrainedWeightsError` (a
    ``ValueError``) with one line naming the file and what is wrong with it otherwise.
    """
    path = os.fspath(path)
    state = _read_weights(path)
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    for k, v in state.items():
        if not torch.is_tensor(v):
            raise PretrainedWeightsError(f"{path}: entry {k} is not a tensor ({type(v).__name__}); expected a "
                                         f"state dict of a torchvision ResNet")
    state = _strip_prefix(state, "module.")
    if any(k.startswith("base.") for k in state):  # a whole QAConv backbone: keep its trunk
        state = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
    own = backbone.base.state_dict()
    own_ibn = getattr(backbone.base, "ibn", None)
    try:
        file_ibn = trunk_ibn_type(state)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if file_ibn != own_ibn:
        raise ValueError(f"{path}: these weights are {'IBN-' + file_ibn if file_ibn else 'a plain ResNet'}, "
                         f"the trunk is {'IBN-' + own_ibn if own_ibn else 'a plain ResNet'} "
                         f"(use ibn={file_ibn!r} / --ibn {file_ibn or 'none'})")
    children = {name for name, _ in backbone.base.named_children()}
    wanted, ignored = {}, []
    for k, v in state.items():
        if k in own:
            if tuple(own[k].shape) != tuple(v.shape):
                raise PretrainedWeightsError(f"{path}: {k} has shape {tuple(v.shape)}, the trunk expects {tuple(own[k].shape)} "
                                 f"(wrong --arch for these weights?)")
            wanted[k] = v
        elif k.split(".", 1)[0] not in children or k.endswith("num_batches_tracked"):
            ignored.append(k)
        else:
            raise PretrainedWeightsError(f"{path}: unexpected trunk entry {k} (wrong --arch for these weights?)")
    if not wanted:
        shown = ", ".join(list(state)[:3]) + (", ..." if len(state) > 3 else "")
        raise PretrainedWeightsError(f"{path}: no ResNet trunk parameter among its {len(state)} entries ({shown}); "
                                     f"expected torchvision names such as conv1.weight, layer1.0.conv1.weight")
    missing = [k for k in own if k not in wanted and not k.endswith("num_batches_tracked")]
    if missing:
        raise PretrainedWeightsError(f"{path}: {len(missing)} trunk parameters missing, e.g. {missing[:5]} "
                         f"(wrong --arch for these weights?)")
    backbone.base.load_state_dict(wanted, strict=False)
    return {"loaded": len(wanted), "ignored": ignored}


def build_backbone(arch: str = "resnet50", pretrained_path: Optional[str] = None, neck: int = 128,
                   ibn: Optional[str] = None, *, neck_type: str = "bn", final_layer: str = "layer3",
                   neck_kernel: int = 3, name: Optional[str] = None) -> ReIDBackbone:
    """QAConv backbone ``arch`` (``resnet50``, ``resnet152``, ``small``, ... see :data:`ARCHITECTURES`).

    Args:
        arch: the trunk (``name`` is accepted as an alias).
        pretrained_path: optional local file with ImageNet weights (torchvision or IBN-Net naming).
        neck: channels of the neck convolution (``<= 0``: no neck).
        ibn: None, ``"a"`` or ``"b"``: the IBN-Net variant of ResNet-18/34/50/101 (the public QAConv
            2.x default is IBN-b).
        neck_type: ``"bn"`` (conv + BatchNorm, public v1.x/v2.0) or ``"bias"`` (conv with bias, v2.1+).
        final_layer: the last trunk stage (``layer2``/``layer3``/``layer4``; stride 8/16/32).
        neck_kernel: the neck convolution's kernel size.
    """
    if name is not None:
        arch = name
    base = resnet(arch, final_layer, ibn=ibn)
    model = ReIDBackbone(base, base.out_channels, neck=neck, neck_kernel=neck_kernel, neck_type=neck_type)
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    return model


def feature_map_size(backbone: nn.Module, height: int, width: int) -> Tuple[int, int, int]:
    """``(channels, height, width)`` of the backbone's output for ``height x width`` images."""
    was_training = backbone.training
    backbone.eval()
    try:
        p = next(backbone.parameters(), None)
        x = torch.zeros(1, 3, int(height), int(width),
                        device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None else torch.float32)
        with torch.no_grad():
            out = backbone(x)
    finally:
        backbone.train(was_training)
    if out.dim() != 4:
        raise ValueError(f"backbone output must be [B, d, h, w], got shape {tuple(out.shape)}")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])
