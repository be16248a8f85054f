"""ResNet trunks with torchvision's parameter names, so ImageNet weights load from a local file.

Only the layers a re-id feature map needs are built (``conv1 .. layerK``; no ``avgpool``/``fc``).
Parameter names follow ``torchvision.models.resnet`` exactly (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` ...), so a torchvision state dict loads once its ``layer4.*``/``fc.*``
entries are dropped (see :func:`qaconv_ext.models.backbone.load_pretrained`).

Variants: ``resnet18/34`` (basic blocks), ``resnet50/101/152`` (bottlenecks, stride on the 3x3
conv as in torchvision), and ``small``: a narrow basic-block net (widths 32-64-128, one block per
stage, no max-pool, stride 8) for CPU runs on small images.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Type, Union

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "RESNET_SPECS", "resnet"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided) - 1x1 bottleneck with expansion 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


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

    ``out_channels`` is the channel count of the last stage; ``stride`` the total down-sampling.
    """

    def __init__(self, block: Block, layers: Sequence[int], widths: Sequence[int] = (64, 128, 256),
                 stem_width: int = 64, maxpool: bool = True,
                 strides: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if len(widths) != len(layers):
            raise ValueError(f"widths ({len(widths)}) and layers ({len(layers)}) must have the same length")
        strides = list(strides) if strides is not None else [1] + [2] * (len(layers) - 1)
        self.inplanes = stem_width
        self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        if maxpool:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.num_stages = len(layers)
        for i, (n, w, s) in enumerate(zip(layers, widths, strides)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, w, n, s))
        self.out_channels = self.inplanes
        self.stride = 2 * (2 if maxpool else 1) * math.prod(strides)
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        mods: List[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
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


def resnet(name: str, final_layer: str = "layer3") -> ResNet:
    """Build the trunk ``name`` (a key of :data:`RESNET_SPECS`) up to ``final_layer`` (layer2..layer4)."""
    key = name.lower()
    if key not in RESNET_SPECS:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(RESNET_SPECS)}")
    spec = dict(RESNET_SPECS[key])
    if not final_layer.startswith("layer") or not final_layer[5:].isdigit():
        raise ValueError(f"final_layer must be 'layer2', 'layer3' or 'layer4', got {final_layer!r}")
    stages = int(final_layer[5:])
    layers = spec.pop("layers")
    if not 1 <= stages <= len(layers):
        raise ValueError(f"{name} has {len(layers)} stages; final_layer={final_layer!r} is out of range")
    widths = spec.pop("widths", (64, 128, 256, 512))
    return ResNet(spec.pop("block"), layers[:stages], widths=widths[:stages], **spec)
