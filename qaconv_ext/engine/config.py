"""Training settings as one plain dataclass (stored in checkpoints as a plain dict)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Defaults follow the paper's training recipe: batch 32, SGD (momentum 0.9, Nesterov, weight
    decay 5e-4), learning rate 0.01 for new layers and 0.1x that for the pretrained trunk, x0.1 after
    40 of 60 epochs, 384x128 inputs, Random Block and flips, the public code's input preset (bicubic
    resize, [0, 1], no mean/std).
    """

    method: str = "qaconv"              # "qaconv" (class-memory loss) or "baseline" (GAP + cosine softmax)
    arch: str = "resnet50"
    pretrained: Optional[str] = None     # local file with ImageNet weights (torchvision naming)
    neck: int = 128
    layout: str = "v2"                   # QAConv head layout: "v2" or "eccv"
    ibn: Optional[str] = None            # IBN-Net variant of the trunk: None, "a" or "b"
    neck_type: str = "bn"                # "bn" (conv + BatchNorm, public v1.x) or "bias" (conv with bias, v2.1+)
    preprocess: str = "public"           # input preset: "public" (bicubic, [0, 1]) or "imagenet" (mean/std)
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

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (safe for ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def summary(self) -> List[str]:
        """``key=value`` strings of the fields that matter for a log line."""
        keys = ("method", "arch", "height", "width", "epochs", "batch_size", "lr", "step_size", "neck", "layout",
                "preprocess")
        return [f"{k}={getattr(self, k)}" for k in keys]
