"""Evaluation of a trained model with the work split across ranks; rank 0 computes the metrics."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..evaluation.scoring import (BASELINE_ROW, QACONV_ROW, RR_ROW, TLIFT_ROW, QAConvEvaluation, rank_metrics,
                                  rerank_distance, self_score_blocks, tlift_distance)
from ..evaluation.trained import metric_rows
from .collectives import all_gather_rows
from .env import rank
from .scoring import sharded_extract_features, sharded_score_blocks, sharded_self_score_blocks

__all__ = ["sharded_evaluate_qaconv", "sharded_evaluate_baseline", "sharded_evaluate_trained"]


def sharded_evaluate_qaconv(backbone: nn.Module, head: nn.Module, query: Sequence[Any], gallery: Sequence[Any],
                            height: int, width: int, *, batch_size: int = 64,
                            device: Union[str, torch.device] = "cpu", workers: int = 0, rerank: bool = False,
                            tlift: bool = False, tlift_params: Optional[Dict[str, float]] = None,
                            rerank_mode: str = "dense", progress: bool = True,
                            gallery_chunk: int = 2048) -> Optional[QAConvEvaluation]:
    """:func:`~qaconv_ext.evaluation.evaluate_qaconv` across the process group.

    Each rank extracts its shard of the queries (gathered to every rank) and of the gallery (kept
    local), scores all queries against its gallery shard, and rank 0 assembles the ``[P, N]`` scores.
    With re-ranking, the gallery features are gathered and the gallery-gallery blocks dealt to the
    ranks; the query-query block is scored on rank 0. Rank 0 returns the evaluation (the same
    numbers as one process, bit for bit on the CPU), the other ranks ``None``.
    """
    device = torch.device(device)
    backbone = backbone.to(device)
    head = head.to(device).eval()
    show = progress and rank() == 0
    q_fea = sharded_extract_features(backbone, query, height, width, batch_size, device, workers, show,
                                     "query features", gather=True, out_device=device)
    g_local = sharded_extract_features(backbone, gallery, height, width, batch_size, device, workers, show,
                                       "gallery features", gather=False, out_device=device)
    s_qg = sharded_score_blocks(head, q_fea, g_local, progress=show, gallery_chunk=gallery_chunk)
    s_gg = None
    if rerank or tlift:
        g_fea = all_gather_rows(g_local)
        s_gg = sharded_self_score_blocks(head, g_fea, progress=show, desc="QAConv gallery-gallery")
    if rank() != 0:
        return None
    results: Dict[str, Any] = {QACONV_ROW: rank_metrics(-s_qg, query, gallery)}
    scores = {"qg": s_qg}
    if s_gg is not None:
        s_qq = self_score_blocks(head, q_fea, progress=show, desc="QAConv query-query")
        scores.update(qq=s_qq, gg=s_gg)
        d_rr = rerank_distance(s_qg, s_qq, s_gg, mode=rerank_mode)
        results[RR_ROW] = rank_metrics(d_rr, query, gallery)
        if tlift and all(r.time is not None for r in list(query) + list(gallery)):
            results[TLIFT_ROW] = rank_metrics(tlift_distance(d_rr, query, gallery, **(tlift_params or {})),
                                              query, gallery)
    return QAConvEvaluation(rows=results, scores=scores)


def sharded_evaluate_baseline(backbone: nn.Module, query: Sequence[Any], gallery: Sequence[Any], height: int,
                              width: int, *, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
                              workers: int = 0, progress: bool = True) -> Optional[Dict[str, Any]]:
    """:func:`~qaconv_ext.evaluation.evaluate_baseline` with the feature extraction split across ranks
    (rank 0 returns the metrics, the others ``None``)."""
    from ..models.baseline import GAPCosine

    model = GAPCosine(backbone).to(device)
    show = progress and rank() == 0
    q = sharded_extract_features(model, query, height, width, batch_size, device, workers, show, "query features")
    g = sharded_extract_features(model, gallery, height, width, batch_size, device, workers, show,
                                 "gallery features")
    return rank_metrics(1.0 - q @ g.t(), query, gallery) if rank() == 0 else None


def sharded_evaluate_trained(backbone: nn.Module, head: Optional[nn.Module], dataset: Any, height: int, width: int, *,
                             device: Union[str, torch.device] = "cpu", batch_size: int = 64, workers: int = 0,
                             rerank: bool = False, tlift: bool = False, progress: bool = True,
                             rerank_mode: str = "dense") -> Optional[Dict[str, Dict[str, float]]]:
    """:func:`~qaconv_ext.evaluation.evaluate_trained` across the process group: the
    :func:`~qaconv_ext.evaluation.metric_rows` of :func:`sharded_evaluate_qaconv` (``head`` given) or of
    :func:`sharded_evaluate_baseline` (``head`` None) on rank 0; ``None`` on the other ranks."""
    if head is None:
        m = sharded_evaluate_baseline(backbone, dataset.query, dataset.gallery, int(height), int(width),
                                      batch_size=batch_size, device=device, workers=workers, progress=progress)
        return None if m is None else metric_rows({BASELINE_ROW: m})
    ev = sharded_evaluate_qaconv(backbone, head, dataset.query, dataset.gallery, int(height), int(width),
                                 batch_size=batch_size, device=device, workers=workers, rerank=rerank,
                                 tlift=tlift, progress=progress, rerank_mode=rerank_mode)
    return None if ev is None else metric_rows(ev.rows)
