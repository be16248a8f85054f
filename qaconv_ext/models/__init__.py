"""Backbones (ResNet trunks with QAConv's neck) and the GAP + cosine baseline."""
from .backbone import (
    ARCHITECTURES,
    FeatureMapAdapter,
    PretrainedWeightsError,
    ReIDBackbone,
    build_backbone,
    feature_map_size,
    load_pretrained,
)
from .baseline import GAPCosine, gap_features
from .resnet import RESNET_SPECS, BasicBlock, Bottleneck, ResNet, resnet

__all__ = [
    "ARCHITECTURES", "ReIDBackbone", "FeatureMapAdapter", "build_backbone", "feature_map_size", "load_pretrained",
    "PretrainedWeightsError",
    "GAPCosine", "gap_features",
    "RESNET_SPECS", "BasicBlock", "Bottleneck", "ResNet", "resnet",
]
