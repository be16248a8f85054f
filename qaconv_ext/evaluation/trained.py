"""Evaluating a trained model (QAConv or the GAP baseline) on a dataset's query and gallery sets."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn

__all__ = ["ROW_KEYS", "metric_rows", "evaluate_trained"]

#: The metrics of a result row, in table order.
ROW_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def metric_rows(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, float]]:
    """``{name: {rank1, rank5, rank10, mAP, mINP}}`` as plain floats (the CMC curve and other keys
    dropped): the rows of the result tables and JSON files."""
    return {name: {k: float(m[k]) for k in ROW_KEYS} for name, m in results.items()}


def evaluate_trained(backbone: nn.Module, head: Optional[nn.Module], dataset: Any, height: int, width: int, *,
                     device: Union[str, torch.device] = "cpu", batch_size: int = 64, workers: int = 0,
                     rerank: bool = False, tlift: bool = False, progress: bool = True,
                     rerank_mode: str = "dense", amp: Optional[bool] = None) -> Dict[str, Dict[str, float]]:
    """:func:`metric_rows` of a QAConv model (``head`` given; the re-ranking and TLift rows on request,
    :func:`~qaconv_ext.evaluation.evaluate_qaconv`) or of a baseline (``head`` None, one row,
    :func:`~qaconv_ext.evaluation.evaluate_baseline`) on ``dataset.query`` against ``dataset.gallery``,
    with images resized to ``height x width``. ``rerank_mode``: see
    :func:`~qaconv_ext.evaluation.evaluate_qaconv` (``"sparse"`` never holds the gallery-gallery matrix);
    ``amp``: its reduced precision (bfloat16 feature maps on the CPU; the baseline ignores it)."""
    from .scoring import BASELINE_ROW, evaluate_baseline, evaluate_qaconv

    height, width = int(height), int(width)
    if head is None:
        results = {BASELINE_ROW: evaluate_baseline(backbone, dataset.query, dataset.gallery, height, width,
                                                   batch_size=batch_size, device=device, workers=workers,
                                                   progress=progress)}
    else:
        results = evaluate_qaconv(backbone, head, dataset.query, dataset.gallery, height, width,
                                  batch_size=batch_size, device=device, workers=workers, rerank=rerank,
                                  tlift=tlift, progress=progress, rerank_mode=rerank_mode, amp=amp).rows
    return metric_rows(results)
