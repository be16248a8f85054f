"""Training losses: QAConv's class-memory loss, the batch losses of QAConv 2.x (hard triplet and pairwise
matching, used with graph sampling), and the cosine-softmax loss of the GAP baseline.

All take ``(feature [B, d, h, w], target [B])`` and return per-sample ``(loss [B], acc [B])``; the
trainer averages them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ClassMemoryLoss", "TripletLoss", "PairwiseMatchingLoss", "CosineSoftmaxLoss", "focal_bce_with_logits"]


def focal_bce_with_logits(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Element-wise BCE-with-logits times the focal weight ``(1 - p)^gamma`` (positives) or ``p^gamma``
    (negatives), ``p = sigmoid(logits)``. The weight is not detached. ``target`` is 0/1."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    weight = torch.where(target > 0.5, 1.0 - prob, prob).pow(gamma)
    return loss * weight


class ClassMemoryLoss(nn.Module):
    """QAConv's class-memory loss (ECCV 2020, Sec. 3.3).

    A buffer ``class_memory [C, d, h, w]`` (zeros) holds the latest feature map of every class and
    ``valid_class [C]`` marks the classes seen so far. For a batch, the features are matched (query
    side) against the detached memory (gallery side) by ``matcher`` -- a :class:`~qaconv_ext.QAConv`
    head, in training mode with batch statistics -- giving logits ``[B, C]``. The loss per sample is
    the focal-weighted BCE (``gamma = 2``) summed over the valid classes; accuracy is
    ``argmax == target``. Afterwards, without gradient, ``class_memory[target] = feature`` (direct
    replacement; with repeated classes in a batch the last sample wins) and ``valid_class[target] = 1``.

    Args:
        matcher: module mapping ``(query [B, d, h, w], gallery [C, d, h, w])`` to logits ``[B, C]``.
        num_classes, num_features, height, width: the memory's shape.
        gamma: focal exponent (2 in the paper).
        mem_batch_size: ``None`` (default, ECCV 2020) matches the whole memory in one call of ``matcher``;
            an integer ``k`` matches it in chunks of ``k`` classes, one call per chunk in class order, as
            the public code does from v1.2 on: in training mode each chunk's logits are normalised with
            that chunk's own BatchNorm statistics, and the running statistics are updated once per
            chunk, in that order. ``k >= num_classes`` is one call, as ``None``.
    """

    def __init__(self, matcher: nn.Module, num_classes: int, num_features: int, height: int, width: int,
                 gamma: float = 2.0, mem_batch_size: Optional[int] = None) -> None:
        super().__init__()
        if mem_batch_size is not None and (isinstance(mem_batch_size, bool) or int(mem_batch_size) != mem_batch_size
                                           or mem_batch_size < 1):
            raise ValueError(f"ClassMemoryLoss: mem_batch_size must be None or a positive integer, "
                             f"got {mem_batch_size!r}")
        self.mem_batch_size = None if mem_batch_size is None else int(mem_batch_size)
        self.matcher = matcher
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)
        self.height = int(height)
        self.width = int(width)
        self.gamma = float(gamma)
        expected = tuple(getattr(matcher, a, None) for a in ("num_features", "height", "width"))
        if None not in expected and expected != (self.num_features, self.height, self.width):
            raise ValueError(f"ClassMemoryLoss: the memory is {self.num_features}x{self.height}x{self.width} "
                             f"(d x h x w), the matcher was built for {'x'.join(map(str, expected))}")
        self.register_buffer("class_memory", torch.zeros(self.num_classes, self.num_features,
                                                         self.height, self.width))
        self.register_buffer("valid_class", torch.zeros(self.num_classes))

    def reset_running_stats(self) -> None:
        """Empty the memory and the matcher's running statistics."""
        self.class_memory.zero_()
        self.valid_class.zero_()
        if hasattr(self.matcher, "reset_running_stats"):
            self.matcher.reset_running_stats()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_features={self.num_features}, "
                f"height={self.height}, width={self.width}, gamma={self.gamma}, mem_batch_size={self.mem_batch_size}")

    def forward(self, feature: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss [B], acc [B])`` for feature maps ``[B, d, h, w]`` and class labels ``[B]``."""
        if feature.dim() != 4:
            raise ValueError(f"ClassMemoryLoss: expected a 4-D feature map, got shape {tuple(feature.shape)}")
        if tuple(feature.shape[1:]) != tuple(self.class_memory.shape[1:]):
            raise ValueError(f"ClassMemoryLoss: features {tuple(feature.shape[1:])} do not match the memory "
                             f"{tuple(self.class_memory.shape[1:])}")
        target = target.to(device=feature.device, dtype=torch.long).reshape(-1)
        if target.numel() != feature.shape[0]:
            raise ValueError(f"ClassMemoryLoss: {target.numel()} targets for {feature.shape[0]} features")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"ClassMemoryLoss: targets must lie in [0, {self.num_classes}), "
                             f"got [{int(target.min())}, {int(target.max())}]")
        memory = self.class_memory.detach().to(feature.dtype, copy=True)  # updated in place below
        k = self.mem_batch_size
        if k is None or k >= self.num_classes:
            score = self.matcher(feature, memory)  # [B, C]
        else:   # chunk by chunk: each call normalises with its own statistics and updates the running ones
            score = torch.cat([self.matcher(feature, memory[i:i + k]) for i in range(0, self.num_classes, k)],
                              dim=1)
        if score.dtype in (torch.float16, torch.bfloat16):
            score = score.float()
        onehot = torch.zeros_like(score).scatter_(1, target[:, None], 1.0)
        loss = focal_bce_with_logits(score, onehot, self.gamma)
        loss = (loss * self.valid_class.detach().to(score.dtype, copy=True)[None, :]).sum(dim=-1)
        with torch.no_grad():
            acc = (score.argmax(dim=1) == target).to(score.dtype)
            self.update_memory(feature, target)
        return loss, acc

    @torch.no_grad()
    def update_memory(self, feature: torch.Tensor, target: torch.Tensor) -> None:
        """``class_memory[target] = feature`` (last sample wins for repeated classes), mark valid."""
        order = torch.arange(target.numel(), device=target.device)
        last = torch.full((self.num_classes,), -1, dtype=torch.long, device=target.device)
        last.scatter_reduce_(0, target, order, reduce="amax")
        classes = torch.nonzero(last >= 0).reshape(-1)
        self.class_memory[classes] = feature.detach()[last[classes]].to(self.class_memory.dtype)
        self.valid_class[classes] = 1.0


def _pair_masks(target: torch.Tensor, n: int, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(same [B, B], eye [B, B])`` boolean masks of a batch's labels."""
    target = target.reshape(-1)
    if target.numel() != n:
        raise ValueError(f"{what}: {target.numel()} targets for {n} features")
    same = target[:, None] == target[None, :]
    return same, torch.eye(n, dtype=torch.bool, device=target.device)


#: Stand-in for "no such pair" in the hardest-pair search (the public code's 1e15).
_FAR = 1e15


def _hardest_pairs(score: torch.Tensor, same: torch.Tensor, eye: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: the lowest score of a positive other than itself (``1e15`` when there is none) and the
    highest score of a negative (``-1e15`` when there is none)."""
    min_pos = torch.where(same & ~eye, score, torch.full_like(score, _FAR)).min(dim=1).values
    max_neg = torch.where(same, torch.full_like(score, -_FAR), score).max(dim=1).values
    return min_pos, max_neg


def _batch_scores(matcher: nn.Module, feature: torch.Tensor, what: str) -> torch.Tensor:
    if feature.dim() != 4:
        raise ValueError(f"{what}: expected a 4-D feature map, got shape {tuple(feature.shape)}")
    score = matcher(feature, feature)  # [B, B]
    return score.float() if score.dtype in (torch.float16, torch.bfloat16) else score


class _BatchMatchingLoss(nn.Module):
    """A loss on the batch matched against itself by ``matcher`` (QAConv 2.x's losses)."""

    def __init__(self, matcher: nn.Module) -> None:
        super().__init__()
        self.matcher = matcher

    def reset_running_stats(self) -> None:
        if hasattr(self.matcher, "reset_running_stats"):
            self.matcher.reset_running_stats()

    def _scores(self, feature: torch.Tensor, target: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(score [B, B], same-class mask, identity mask)``."""
        what = type(self).__name__
        score = _batch_scores(self.matcher, feature, what)
        same, eye = _pair_masks(target.to(score.device), score.shape[0], what)
        return score, same, eye


class TripletLoss(_BatchMatchingLoss):
    """Hard triplet loss on QAConv scores within a batch (QAConv 2.x with graph sampling).

    The batch is matched against itself, ``score = matcher(feature, feature)`` ``[B, B]`` (the head in
    training mode). For sample ``i``: ``min_pos`` = lowest score of another sample of its class,
    ``max_neg`` = highest score of a sample of another class; ``loss = max(0, max_neg - min_pos +
    margin)`` and ``acc = (min_pos >= max_neg)``. A sample without another of its class (or without a
    sample of another class) has loss 0 and acc 1, as in the public code (there ``1e15`` stands in for
    the missing pair).

    Args:
        matcher: module mapping ``(query [B, d, h, w], gallery [B, d, h, w])`` to scores ``[B, B]``.
        margin: the hinge margin (public default 16, on the scale of QAConv logits).
    """

    def __init__(self, matcher: nn.Module, margin: float = 16.0) -> None:
        super().__init__(matcher)
        self.margin = float(margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"

    def forward(self, feature: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss [B], acc [B])`` for feature maps ``[B, d, h, w]`` and class labels ``[B]``."""
        score, same, eye = self._scores(feature, target)
        min_pos, max_neg = _hardest_pairs(score, same, eye)
        loss = F.relu(max_neg - min_pos + self.margin)
        with torch.no_grad():
            acc = (min_pos >= max_neg).to(score.dtype)
        return loss, acc


class PairwiseMatchingLoss(_BatchMatchingLoss):
    """Pairwise matching loss of QAConv 2.x: binary cross-entropy on every pair of the batch.

    ``score = matcher(feature, feature)`` ``[B, B]``; the label of pair ``(i, j)`` is 1 when the two
    samples share a class (``i = j`` included: the public code masks no pair) and 0 otherwise; the loss
    of sample ``i`` is the sum over ``j`` of BCE-with-logits, without focal weighting.
    ``acc = (min_pos > max_neg)`` (strictly), with ``min_pos``/``max_neg`` as in :class:`TripletLoss`.
    """

    def forward(self, feature: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss [B], acc [B])``."""
        score, same, eye = self._scores(feature, target)
        loss = F.binary_cross_entropy_with_logits(score, same.to(score.dtype), reduction="none").sum(dim=-1)
        with torch.no_grad():
            min_pos, max_neg = _hardest_pairs(score, same, eye)
            acc = (min_pos > max_neg).to(score.dtype)
        return loss, acc


class CosineSoftmaxLoss(nn.Module):
    """Softmax cross-entropy over cosine logits of globally pooled features (the GAP baseline).

    ``feature [B, d, h, w]`` (or ``[B, d]``) is average-pooled, L2-normalised and compared with
    L2-normalised class weights ``[C, d]``; logits are ``scale * cos``. ``acc`` is ``argmax == target``.
    """

    def __init__(self, num_features: int, num_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.num_features))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.num_features))

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, num_classes={self.num_classes}, scale={self.scale}"

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        """``scale * cos(pooled feature, class weight)`` -> ``[B, C]``."""
        v = feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature
        if v.dtype in (torch.float16, torch.bfloat16):
            v = v.float()
        return self.scale * F.linear(F.normalize(v, dim=1), F.normalize(self.weight.to(v.dtype), dim=1))

    def forward(self, feature: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss [B], acc [B])``."""
        target = target.to(device=feature.device, dtype=torch.long).reshape(-1)
        logits = self.logits(feature)
        loss = F.cross_entropy(logits, target, reduction="none")
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == target).to(logits.dtype)
        return loss, acc
