"""Evaluation of a trained model with the work split across ranks; rank 0 computes the metrics."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..config import DEFAULT_PRESET
from ..evaluation.scoring import QAConvEvaluation, check_rerank_mode, evaluate_scores, feature_dtype, rank_metrics
from ..evaluation.trained import trained_rows
from ..models.baseline import GAPCosine
from ..scoring import score_rows, self_score_blocks
from .collectives import all_gather_rows
from .env import rank
from .scoring import sharded_extract_features, sharded_score_blocks, sharded_self_score_blocks

__all__ = ["sharded_evaluate_qaconv", "sharded_evaluate_baseline", "sharded_evaluate_trained"]


def sharded_evaluate_qaconv(backbone: nn.Module, head: nn.Module, query: Sequence[Any], gallery: Sequence[Any],
                            height: int, width: int, *, batch_size: int = 64,
                            device: Union[str, torch.device] = "cpu", workers: int = 0, rerank: bool = False,
                            tlift: bool = False, tlift_params: Optional[Dict[str, float]] = None,
                            rerank_mode: str = "dense", progress: bool = True, gallery_chunk: int = 2048,
                            amp: Optional[bool] = None, preprocess: str = DEFAULT_PRESET
                            ) -> Optional[QAConvEvaluation]:
    """:func:`~qaconv_ext.evaluation.evaluate_qaconv` across the process group.

    Each rank extracts its shard of the queries (gathered to every rank) and of the gallery (kept
    local), scores all queries against its gallery shard, and rank 0 assembles the ``[P, N]`` scores.
    With re-ranking the gallery features are gathered; ``rerank_mode="dense"`` deals the
    gallery-gallery blocks to the ranks by pair count, ``"sparse"`` lets rank 0's re-ranking stream the
    gallery rows from the fused op (no ``[N, N]`` matrix anywhere). Rank 0 then scores the query-query
    block and runs the tail every evaluation shares (:func:`~qaconv_ext.evaluation.evaluate_scores`);
    it returns the evaluation (the numbers of one process), the other ranks ``None``. ``amp`` and
    ``preprocess`` as in ``evaluate_qaconv``.
    """
    check_rerank_mode(rerank_mode)
    device = torch.device(device)
    backbone, head = backbone.to(device), head.to(device)
    show = progress and rank() == 0
    options = dict(out_device=device, preprocess=preprocess, amp=amp, dtype=feature_dtype(amp, device))
    q_fea = sharded_extract_features(backbone, query, height, width, batch_size, device, workers, show,
                                     "query features", gather=True, **options)
    g_local = sharded_extract_features(backbone, gallery, height, width, batch_size, device, workers, show,
                                       "gallery features", gather=False, **options)
    s_qg = sharded_score_blocks(head, q_fea, g_local, progress=show, gallery_chunk=gallery_chunk)
    s_gg: Any = None
    if rerank or tlift:
        g_fea = all_gather_rows(g_local)
        if rerank_mode == "dense":
            s_gg = sharded_self_score_blocks(head, g_fea, progress=show, desc="QAConv gallery-gallery")
        elif rank() == 0:
            s_gg = score_rows(head, g_fea)
    if rank() != 0:
        return None
    s_qq = self_score_blocks(head, q_fea, progress=show, desc="QAConv query-query") if rerank or tlift else None
    return evaluate_scores(s_qg, query, gallery, s_qq=s_qq, s_gg=s_gg, rerank=rerank, tlift=tlift,
                           tlift_params=tlift_params, rerank_mode=rerank_mode, progress=show)


def sharded_evaluate_baseline(backbone: nn.Module, query: Sequence[Any], gallery: Sequence[Any], height: int,
                              width: int, *, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
                              workers: int = 0, progress: bool = True, preprocess: str = DEFAULT_PRESET
                              ) -> Optional[Dict[str, Any]]:
    """:func:`~qaconv_ext.evaluation.evaluate_baseline` with the feature extraction split across ranks
    (rank 0 returns the metrics, the others ``None``)."""
    model = GAPCosine(backbone).to(device)
    show = progress and rank() == 0
    q, g = (sharded_extract_features(model, recs, height, width, batch_size, device, workers, show, desc,
                                     preprocess=preprocess)
            for recs, desc in ((query, "query features"), (gallery, "gallery features")))
    return rank_metrics(1.0 - q @ g.t(), query, gallery) if rank() == 0 else None


def sharded_evaluate_trained(backbone: nn.Module, head: Optional[nn.Module], dataset: Any, height: int, width: int, *,
                             device: Union[str, torch.device] = "cpu", batch_size: int = 64, workers: int = 0,
                             rerank: bool = False, tlift: bool = False, progress: bool = True,
                             rerank_mode: str = "dense", amp: Optional[bool] = None,
                             preprocess: str = DEFAULT_PRESET) -> Optional[Dict[str, Dict[str, float]]]:
    """:func:`~qaconv_ext.evaluation.evaluate_trained` across the process group: the
    :func:`~qaconv_ext.evaluation.metric_rows` of :func:`sharded_evaluate_qaconv` (``head`` given) or of
    :func:`sharded_evaluate_baseline` (``head`` None) on rank 0; ``None`` on the other ranks."""
    return trained_rows(sharded_evaluate_qaconv, sharded_evaluate_baseline, backbone, head, dataset, height, width,
                        device=device, batch_size=batch_size, workers=workers, rerank=rerank, tlift=tlift,
                        progress=progress, rerank_mode=rerank_mode, amp=amp, preprocess=preprocess)
