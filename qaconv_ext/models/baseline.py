"""The GAP + cosine baseline of the paper's Table 2: same backbone, globally pooled features.

Training uses :class:`~qaconv_ext.losses.CosineSoftmaxLoss` (softmax over cosine logits) on the
backbone's feature maps; matching is the cosine similarity of the average-pooled, L2-normalised
feature vectors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..losses import CosineSoftmaxLoss
from .backbone import build_backbone

__all__ = ["GAPCosine", "gap_features", "cosine_scores", "build_baseline"]


def gap_features(fea: torch.Tensor) -> torch.Tensor:
    """Average-pool feature maps ``[B, d, h, w]`` and L2-normalise -> ``[B, d]`` (float32)."""
    return F.normalize(fea.float().mean(dim=(2, 3)), dim=1)


def cosine_scores(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[P, N]`` of pooled vectors (or maps, pooled first); higher = more similar."""
    q = gap_features(query) if query.dim() == 4 else F.normalize(query.float(), dim=1)
    g = gap_features(gallery) if gallery.dim() == 4 else F.normalize(gallery.float(), dim=1)
    return q @ g.t()


class GAPCosine(nn.Module):
    """``backbone`` followed by global average pooling and L2 norm: images -> ``[B, d]`` vectors."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def preprocess(self) -> Optional[str]:
        """The backbone's input preset (see :class:`~qaconv_ext.models.ReIDBackbone`), if known."""
        return getattr(self.backbone, "preprocess", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gap_features(self.backbone(x))


def build_baseline(name: str, num_classes: int, pretrained_path: Optional[str] = None, neck: int = 128,
                   scale: float = 16.0) -> Tuple[nn.Module, CosineSoftmaxLoss]:
    """``(backbone, criterion)`` of the baseline: the QAConv backbone and a cosine-softmax classifier."""
    backbone = build_backbone(name, pretrained_path=pretrained_path, neck=neck)
    return backbone, CosineSoftmaxLoss(backbone.num_features, num_classes, scale=scale)
