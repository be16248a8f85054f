"""ResNet and IBN-Net trunks with the public parameter names, so ImageNet weights load from a local file.

Only the layers a re-id feature map needs are built (``conv1 .. layerK``; no ``avgpool``/``fc``).
Parameter names follow ``torchvision.models.resnet`` exactly (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...), so a torchvision state dict loads once its ``layer4.*``/``fc.*``
entries are dropped (see :func:`qaconv_ext.models.backbone.load_pretrained`).

Variants: ``resnet18/34`` (basic blocks), ``resnet50/101/152`` (bottlenecks, stride on the 3x3
conv as in torchvision), and ``small``: a narrow basic-block net (widths 32-64-128, one block per
stage, no max-pool, stride 8) for CPU runs on small images.

IBN-Net (Pan et al., ECCV 2018), ``ibn="a"`` or ``"b"`` on ResNet-18/34/50/101, with the names of
its reference implementation (``IN``/``BN`` submodules):

* IBN-a: in every block of stages 1-3 the normalisation after the first convolution (``bn1``) is an
  :class:`IBN` layer: the first ``int(planes / 2)`` channels go through an affine InstanceNorm
  (``bn1.IN``), the others through a BatchNorm (``bn1.BN``). The stem and stage 4 are unchanged.
* IBN-b: the stem's ``bn1`` is an affine InstanceNorm (before the ReLU and the max-pool), and the
  last block of stages 1 and 2 applies an affine InstanceNorm (``IN``) to the sum of its residual
  branch and shortcut, before the final ReLU (for ResNet-50: ``layer1.2.IN``, ``layer2.3.IN``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Type, Union

import torch
from torch import nn

__all__ = ["IBN", "BasicBlock", "Bottleneck", "ResNet", "RESNET_SPECS", "IBN_TYPES", "IBN_ARCHITECTURES", "resnet"]

#: IBN-Net variants accepted by :func:`resnet` (None: a plain ResNet).
IBN_TYPES = (None, "a", "b")
#: The trunks that have IBN-Net variants.
IBN_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class IBN(nn.Module):
    """Instance-batch normalisation: affine InstanceNorm on the first ``int(planes * ratio)`` channels
    (``IN``), BatchNorm on the rest (``BN``), outputs concatenated in channel order."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), dim=1)


def _first_norm(planes: int, ibn: Optional[str]) -> nn.Module:
    return IBN(planes) if ibn == "a" else nn.BatchNorm2d(planes)


def _residual_out(out: torch.Tensor, identity: torch.Tensor, instance_norm: Optional[nn.Module],
                  relu: nn.Module) -> torch.Tensor:
    out = out + identity
    if instance_norm is not None:
        out = instance_norm(out)
    return relu(out)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34); ``ibn``: see the module doc."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, ibn: Optional[str] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _first_norm(planes, ibn)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.IN = nn.InstanceNorm2d(planes, affine=True) if ibn == "b" else None
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return _residual_out(out, identity, self.IN, self.relu)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided) - 1x1 bottleneck with expansion 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, ibn: Optional[str] = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = _first_norm(planes, ibn)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.IN = nn.InstanceNorm2d(planes * self.expansion, affine=True) if ibn == "b" else None
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return _residual_out(out, identity, self.IN, self.relu)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """A ResNet trunk ``conv1 -> bn1 -> relu -> [maxpool] -> layer1 .. layerK``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage (its length is the number of stages built).
        widths: base width per stage (output channels are ``width * block.expansion``).
        stem_width: channels of ``conv1``.
        maxpool: keep the 3x3/2 max-pool after the stem (torchvision: yes).
        strides: stride of each stage (torchvision: 1, 2, 2, 2).
        ibn: None, ``"a"`` or ``"b"``: the IBN-Net variant (see the module doc).

    ``out_channels`` is the channel count of the last stage; ``stride`` the total down-sampling.
    """

    def __init__(self, block: Block, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256),
                 stem_width: int = 64, maxpool: bool = True,
                 strides: Optional[Sequence[int]] = None, ibn: Optional[str] = None) -> None:
        super().__init__()
        if len(widths) != len(layers):
            raise ValueError(f"widths ({len(widths)}) and layers ({len(layers)}) must have the same length")
        if ibn not in IBN_TYPES:
            raise ValueError(f"ibn must be one of {IBN_TYPES}, got {ibn!r}")
        strides = list(strides) if strides is not None else [1] + [2] * (len(layers) - 1)
        # IBN-Net's placement: IBN-a in stages 1-3, IBN-b in stages 1-2 (and the stem)
        stage_ibn = {"a": ("a", "a", "a"), "b": ("b", "b")}.get(ibn or "", ())
        self.ibn = ibn
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.InstanceNorm2d(stem_width, affine=True) if ibn == "b" else nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        if maxpool:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.num_stages = len(layers)
        for i, (n, w, s) in enumerate(zip(layers, widths, strides)):
            stage = stage_ibn[i] if i < len(stage_ibn) else None
            setattr(self, f"layer{i + 1}", self._make_layer(block, w, n, s, stage))
        self.out_channels = self.inplanes
        self.stride = 2 * (2 if maxpool else 1) * math.prod(strides)
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int,
                    ibn: Optional[str] = None) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))

        def block_ibn(i: int) -> Optional[str]:
            # IBN-a: every block; IBN-b: only the last block of the stage (never the first)
            if ibn == "b":
                return "b" if 0 < i == blocks - 1 else None
            return ibn

        mods: List[nn.Module] = [block(self.inplanes, planes, stride, downsample, ibn=block_ibn(0))]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, ibn=block_ibn(i)) for i in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


#: Architecture table: block type, blocks per stage, widths, stem width, max-pool.
RESNET_SPECS: Dict[str, Dict] = {
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet34": dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    "resnet152": dict(block=Bottleneck, layers=(3, 8, 36, 3)),
    "small": dict(block=BasicBlock, layers=(1, 1, 1), widths=(32, 64, 128), stem_width=32, maxpool=False),
}


def resnet(name: str, final_layer: str = "layer3", ibn: Optional[str] = None) -> ResNet:
    """Build the trunk ``name`` (a key of :data:`RESNET_SPECS`) up to ``final_layer`` (layer2..layer4).

    ``ibn``: None, ``"a"`` or ``"b"`` for the IBN-Net variants of :data:`IBN_ARCHITECTURES`.
    """
    key = name.lower()
    if key not in RESNET_SPECS:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(RESNET_SPECS)}")
    if isinstance(ibn, str) and ibn.lower() == "none":
        ibn = None
    if ibn not in IBN_TYPES:
        raise ValueError(f"unknown IBN type {ibn!r}; use None, 'a' or 'b'")
    if ibn is not None and key not in IBN_ARCHITECTURES:
        raise ValueError(f"IBN-Net ({ibn!r}) exists for {', '.join(IBN_ARCHITECTURES)}, not for {name}")
    spec = dict(RESNET_SPECS[key])
    if not final_layer.startswith("layer") or not final_layer[5:].isdigit():
        raise ValueError(f"final_layer must be 'layer2', 'layer3' or 'layer4', got {final_layer!r}")
    stages = int(final_layer[5:])
    layers = spec.pop("layers")
    if not 1 <= stages <= len(layers):
        raise ValueError(f"{name} has {len(layers)} stages; final_layer={final_layer!r} is out of range")
    widths = spec.pop("widths", (64, 128, 256, 512))
    return ResNet(spec.pop("block"), layers[:stages], widths=widths[:stages], ibn=ibn, **spec)
