"""Datasets, image reading, transforms and the built-in synthetic camera network."""
from .datasets import (
    DATASETS,
    DUKE_FRAME_OFFSETS,
    DatasetFormatError,
    DukeMTMCreID,
    ImageFolderDataset,
    Market1501,
    MSMT17,
    ReIDDataset,
    build_dataset,
    parse_duke_name,
    parse_market_name,
    parse_msmt_camera,
)
from .samplers import GraphSampler
from .records import ImageDataset, ImageReadError, Record, partition_readable, read_image
from .synthetic import (
    SYNTHETIC_DEFAULTS,
    contact_sheet,
    load_annotations,
    make_synthetic_network,
    plan_synthetic_network,
)
from .transforms import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESS_PRESETS,
    ColorJitter,
    RandomBlock,
    RandomCrop,
    RandomHorizontalFlip,
    RandomOcclusion,
    RandomRotation,
    build_test_transform,
    build_train_transform,
    check_preprocess,
    denormalize,
)

__all__ = [
    "GraphSampler",
    "Record", "read_image", "ImageReadError", "ImageDataset", "partition_readable",
    "ReIDDataset", "Market1501", "DukeMTMCreID", "MSMT17", "ImageFolderDataset",
    "DatasetFormatError", "DATASETS", "build_dataset", "DUKE_FRAME_OFFSETS",
    "parse_market_name", "parse_duke_name", "parse_msmt_camera",
    "build_train_transform", "build_test_transform", "RandomBlock", "RandomHorizontalFlip",
    "RandomOcclusion", "RandomCrop", "RandomRotation", "ColorJitter",
    "PREPROCESS_PRESETS", "AUGMENTATIONS", "check_preprocess", "IMAGENET_MEAN", "IMAGENET_STD", "denormalize",
    "make_synthetic_network", "plan_synthetic_network", "load_annotations", "contact_sheet",
    "SYNTHETIC_DEFAULTS",
]
