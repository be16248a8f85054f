"""Backbones (ResNet and IBN-Net trunks with QAConv's neck) and the GAP + cosine baseline."""
from .backbone import (
    ARCHITECTURES,
    IBN_ARCHITECTURES,
    IBN_TYPES,
    NECK_TYPES,
    FeatureMapAdapter,
    PretrainedWeightsError,
    ReIDBackbone,
    build_backbone,
    feature_map_size,
    load_pretrained,
    trunk_ibn_type,
)
from .baseline import GAPCosine, gap_features
from .resnet import IBN, RESNET_SPECS, BasicBlock, Bottleneck, ResNet, resnet

__all__ = [
    "ARCHITECTURES", "IBN_ARCHITECTURES", "IBN_TYPES", "NECK_TYPES", "ReIDBackbone", "FeatureMapAdapter",
    "build_backbone", "feature_map_size", "load_pretrained", "trunk_ibn_type",
    "PretrainedWeightsError",
    "GAPCosine", "gap_features",
    "RESNET_SPECS", "IBN", "BasicBlock", "Bottleneck", "ResNet", "resnet",
]
