"""The plain settings of the package, importable without PyTorch: the architecture names, the input
presets (and the rule for checkpoints that do not name one), the training recipes and
:class:`TrainConfig`. The command line builds its parsers from these; the library checks against them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["ARCHITECTURES", "NECK_TYPES", "PRESETS", "DEFAULT_PRESET", "LEGACY_PRESET", "AUGMENTATIONS",
           "RECIPES", "RECIPE_DEFAULTS", "RUN_OPTIONS", "check_preset", "preset_of", "TrainConfig"]

#: Backbones :func:`qaconv_ext.models.build_backbone` builds (``small``: a narrow ResNet for CPU runs).
ARCHITECTURES = ("resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "small")
#: Neck variants: 3x3 conv + BatchNorm (public code v1.x/v2.0) or 3x3 conv with bias (v2.1+).
NECK_TYPES = ("bn", "bias")

#: Input presets: how an image becomes the network's input. ``public``: bicubic resize, ``[0, 1]``, no
#: mean/std (the public QAConv code, every release); ``imagenet``: bilinear resize, ImageNet mean/std.
PRESETS = ("public", "imagenet")
#: The preset of a new run, and of a checkpoint of the public code (which records none).
DEFAULT_PRESET = "public"
#: The preset of a checkpoint of this package that records none: such runs normalised with ImageNet
#: mean/std.
LEGACY_PRESET = "imagenet"

#: Training augmentations: the ECCV 2020 recipe and the QAConv 2.x recipe.
AUGMENTATIONS = ("eccv", "v2")

#: The training recipes: ``eccv`` (class-memory loss, step schedule; the ECCV 2020 paper) and ``gs``
#: (QAConv 2.x: graph sampling, hard triplet loss, the loss-driven schedule).
RECIPES = ("eccv", "gs")

#: Where a recipe's defaults differ from :class:`TrainConfig`'s (which are the ``eccv`` recipe's).
#: ``gs`` follows the public code v2.x: batch 64 (2 images per class), lr 0.005 (trunk x0.1 with
#: pretrained weights), gradient clipping at 8, the v2 augmentations, the backbone's BatchNorms frozen
#: (its trainer keeps the backbone in eval mode), at most 60 epochs.
RECIPE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "eccv": {},
    "gs": dict(batch_size=64, lr=0.005, clip_grad=8.0, augment="v2", freeze_bn=True),
}


#: The settings that define a run, by name: the fields of :class:`~qaconv_ext.config.TrainConfig` (and
#: the argparse ``dest`` of ``qaconv train``). None stands for "not given": a new run then takes
#: ``TrainConfig``'s default, a resumed run the checkpoint's value.
RUN_OPTIONS = ("method", "arch", "neck", "layout", "height", "width", "ibn", "neck_type", "preprocess", "augment",
               "pretrained", "epochs", "batch_size", "lr", "base_lr_mult", "step_size", "weight_decay",
               "random_block", "flip", "freeze_bn", "clip_grad", "amp", "workers", "seed", "recipe",
               "mem_batch_size", "num_instance")


def check_preset(preset: str) -> str:
    """``preset`` if it names an input preset, else a ``ValueError`` listing the valid ones."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preprocess {preset!r}; valid: {', '.join(PRESETS)}")
    return preset


def preset_of(config: Optional[Mapping[str, Any]], own_format: bool = True) -> str:
    """The input preset a checkpoint's model was trained with: the one its config records; else
    :data:`LEGACY_PRESET` for this package's checkpoints (``own_format``) and :data:`DEFAULT_PRESET`
    for the public code's."""
    recorded = (config or {}).get("preprocess")
    if recorded is not None:
        return check_preset(recorded)
    return LEGACY_PRESET if own_format else DEFAULT_PRESET


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Defaults follow the paper's training recipe: batch 32, SGD (momentum 0.9, Nesterov, weight
    decay 5e-4), learning rate 0.01 for new layers and 0.1x that for the pretrained trunk, x0.1 after
    40 of 60 epochs, 384x128 inputs, Random Block and flips, the public code's input preset (bicubic
    resize, [0, 1], no mean/std).
    """

    method: str = "qaconv"              # "qaconv" (class-memory loss) or "baseline" (GAP + cosine softmax)
    recipe: str = "eccv"                 # "eccv" (class memory, step schedule) or "gs" (graph sampling, triplet)
    arch: str = "resnet50"
    pretrained: Optional[str] = None     # local file with ImageNet weights (torchvision naming)
    neck: int = 128
    layout: str = "v2"                   # QAConv head layout: "v2" or "eccv"
    ibn: Optional[str] = None            # IBN-Net variant of the trunk: None, "a" or "b"
    neck_type: str = "bn"                # "bn" (conv + BatchNorm, public v1.x) or "bias" (conv with bias, v2.1+)
    preprocess: str = DEFAULT_PRESET     # input preset: "public" (bicubic, [0, 1]) or "imagenet" (mean/std)
    augment: str = "eccv"                # training augmentation: "eccv" or "v2" (QAConv 2.x)
    height: int = 384
    width: int = 128
    epochs: int = 60
    batch_size: int = 32
    lr: float = 0.01                     # new layers (neck, head, classifier)
    base_lr_mult: Optional[float] = None  # trunk lr = lr * mult; default 0.1 with --pretrained, else 1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    step_size: int = 40                  # epochs between x gamma decays
    gamma: float = 0.1
    random_block: bool = True
    flip: bool = True
    freeze_bn: bool = False              # keep the backbone's BatchNorms in eval mode while training
    clip_grad: float = 0.0               # max gradient norm (0: off)
    amp: Optional[bool] = None           # mixed precision; default: on for CUDA (float16), off on the CPU (bfloat16)
    baseline_scale: float = 16.0         # cosine-softmax scale of the baseline
    mem_batch_size: Optional[int] = None  # eccv: classes of the memory per head call (None: all at once)
    num_instance: int = 2                # gs: images per class in a batch
    margin: float = 16.0                 # gs: triplet margin
    step_factor: float = 0.7             # gs: lr x gamma once the epoch loss < this x the base epoch's loss
    workers: int = 2
    seed: int = 0
    device: str = "cpu"
    dataset: str = ""
    data_root: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def trunk_lr_mult(self) -> float:
        """The trunk's learning-rate multiplier actually used."""
        if self.base_lr_mult is not None:
            return float(self.base_lr_mult)
        return 0.1 if self.pretrained else 1.0

    @classmethod
    def for_recipe(cls, recipe: str = "eccv", **values: Any) -> "TrainConfig":
        """A config with ``recipe``'s defaults (:data:`RECIPE_DEFAULTS`), then ``values``."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; use one of {', '.join(RECIPES)}")
        return cls(recipe=recipe, **{**RECIPE_DEFAULTS[recipe], **values})

    def check_recipe(self) -> None:
        """``ValueError`` naming what does not fit the recipe: an unknown recipe, ``gs`` with the baseline,
        a ``gs`` batch that is not a multiple of ``num_instance``, a ``mem_batch_size`` below 1."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; use one of {', '.join(RECIPES)}")
        if self.mem_batch_size is not None and int(self.mem_batch_size) < 1:
            raise ValueError(f"mem_batch_size must be None or a positive integer, got {self.mem_batch_size}")
        if self.recipe == "gs":
            if self.method != "qaconv":
                raise ValueError(f"the gs recipe trains QAConv, not method {self.method!r}")
            if self.num_instance < 1 or self.batch_size % self.num_instance:
                raise ValueError(f"the gs batch size {self.batch_size} is not a multiple of num_instance "
                                 f"{self.num_instance}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (safe for ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> List[str]:
        """``key=value`` strings of the fields that matter for a log line."""
        keys = ("method", "recipe", "arch", "height", "width", "epochs", "batch_size", "lr", "step_size", "neck", "layout",
                "preprocess")
        return [f"{k}={getattr(self, k)}" for k in keys]
