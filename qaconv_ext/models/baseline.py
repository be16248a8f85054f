"""The GAP + cosine baseline of the paper's Table 2: same backbone, globally pooled features.

Training uses :class:`~qaconv_ext.losses.CosineSoftmaxLoss` (softmax over cosine logits) on the
backbone's feature maps; matching is the cosine similarity of the average-pooled, L2-normalised
feature vectors.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GAPCosine", "gap_features"]


def gap_features(fea: torch.Tensor) -> torch.Tensor:
    """Average-pool feature maps ``[B, d, h, w]`` and L2-normalise -> ``[B, d]`` (float32)."""
    return F.normalize(fea.float().mean(dim=(2, 3)), dim=1)


class GAPCosine(nn.Module):
    """``backbone`` followed by global average pooling and L2 norm: images -> ``[B, d]`` vectors."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gap_features(self.backbone(x))
