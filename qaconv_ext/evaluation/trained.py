"""Evaluating a trained model (QAConv or the GAP baseline) on a dataset's query and gallery sets."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..config import DEFAULT_PRESET
from .scoring import BASELINE_ROW, evaluate_baseline, evaluate_qaconv

__all__ = ["ROW_KEYS", "metric_rows", "trained_rows", "evaluate_trained"]

#: The metrics of a result row, in table order.
ROW_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def metric_rows(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, float]]:
    """``{name: {rank1, rank5, rank10, mAP, mINP}}`` as plain floats (the CMC curve and other keys
    dropped): the rows of the result tables and JSON files."""
    return {name: {k: float(m[k]) for k in ROW_KEYS} for name, m in results.items()}


def trained_rows(evaluate_qaconv_fn: Callable[..., Any], evaluate_baseline_fn: Callable[..., Any],
                 backbone: nn.Module, head: Optional[nn.Module], dataset: Any, height: int, width: int, *,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 64, workers: int = 0,
                 rerank: bool = False, tlift: bool = False, progress: bool = True, rerank_mode: str = "dense",
                 amp: Optional[bool] = None, preprocess: str = DEFAULT_PRESET
                 ) -> Optional[Dict[str, Dict[str, float]]]:
    """:func:`evaluate_trained` with the two evaluations given (one process, or the sharded ones, which
    return None on every rank but 0)."""
    common = dict(batch_size=batch_size, device=device, workers=workers, progress=progress, preprocess=preprocess)
    if head is None:
        m = evaluate_baseline_fn(backbone, dataset.query, dataset.gallery, int(height), int(width), **common)
        return None if m is None else metric_rows({BASELINE_ROW: m})
    ev = evaluate_qaconv_fn(backbone, head, dataset.query, dataset.gallery, int(height), int(width), rerank=rerank,
                            tlift=tlift, rerank_mode=rerank_mode, amp=amp, **common)
    return None if ev is None else metric_rows(ev.rows)


def evaluate_trained(backbone: nn.Module, head: Optional[nn.Module], dataset: Any, height: int, width: int, *,
                     device: Union[str, torch.device] = "cpu", batch_size: int = 64, workers: int = 0,
                     rerank: bool = False, tlift: bool = False, progress: bool = True,
                     rerank_mode: str = "dense", amp: Optional[bool] = None,
                     preprocess: str = DEFAULT_PRESET) -> Dict[str, Dict[str, float]]:
    """:func:`metric_rows` of a QAConv model (``head`` given; the re-ranking and TLift rows on request,
    :func:`~qaconv_ext.evaluation.evaluate_qaconv`) or of a baseline (``head`` None, one row,
    :func:`~qaconv_ext.evaluation.evaluate_baseline`) on ``dataset.query`` against ``dataset.gallery``,
    with images resized to ``height x width`` and scaled with the input preset ``preprocess``.
    ``rerank_mode``: see :func:`~qaconv_ext.evaluation.evaluate_qaconv` (``"sparse"`` never holds the
    gallery-gallery matrix); ``amp``: its reduced precision (bfloat16 feature maps on the CPU; the
    baseline ignores it)."""
    rows = trained_rows(evaluate_qaconv, evaluate_baseline, backbone, head, dataset, height, width, device=device,
                        batch_size=batch_size, workers=workers, rerank=rerank, tlift=tlift, progress=progress,
                        rerank_mode=rerank_mode, amp=amp, preprocess=preprocess)
    assert rows is not None
    return rows
