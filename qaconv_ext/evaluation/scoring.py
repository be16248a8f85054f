"""Gallery-scale evaluation: scores in, rows out.

Scores are QAConv logits (higher = more similar) from the fused op with the head folded into its
epilogue (:mod:`qaconv_ext.scoring`). :func:`evaluate_scores` is the tail one process and ``torchrun``
share: ranking uses the distance ``-score`` (float32); re-ranking and TLift work on bounded values: the
distance ``1 - sigmoid(score / 10)`` goes into k-reciprocal re-ranking (dense, or sparse from row
blocks of the gallery-gallery scores), and TLift lifts the similarity ``1 - re-ranked distance``, as in
the public QAConv evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..config import DEFAULT_PRESET
from ..models.baseline import GAPCosine
from ..postprocess import k_reciprocal_rerank, tlift
from ..scoring import ScoreRows, blocks, extract_features, score_blocks, score_rows, self_score_blocks
from .metrics import evaluate_rank

__all__ = [
    "extract_features",
    "score_blocks",
    "self_score_blocks",
    "score_rows",
    "score_to_distance",
    "rank_metrics",
    "format_metrics",
    "rerank_distance",
    "tlift_distance",
    "evaluate_scores",
    "evaluate_qaconv",
    "evaluate_qaconv_features",
    "feature_dtype",
    "QAConvEvaluation",
    "RERANK_MODES",
    "evaluate_baseline",
    "QACONV_ROW",
    "RR_ROW",
    "TLIFT_ROW",
    "BASELINE_ROW",
]

Records = Sequence[Any]

#: Row names of the result tables (the paper's Tables 2 and 3).
QACONV_ROW = "QAConv"
RR_ROW = "QAConv + RR"
TLIFT_ROW = "QAConv + RR + TLift"
BASELINE_ROW = "Baseline (GAP + cosine)"

#: How k-reciprocal re-ranking gets the gallery-gallery scores: ``"dense"`` computes the ``[G, G]``
#: matrix; ``"sparse"`` streams its rows from the fused op in blocks (no ``[G, G]`` matrix exists).
RERANK_MODES = ("dense", "sparse")


def check_rerank_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`RERANK_MODES`, else a ``ValueError``."""
    if mode not in RERANK_MODES:
        raise ValueError(f"rerank_mode: expected one of {RERANK_MODES}, got {mode!r}")
    return mode


def feature_dtype(amp: Optional[bool], device: Union[str, torch.device]) -> torch.dtype:
    """The dtype feature maps are kept in: bfloat16 with ``amp`` on the CPU (scored with float32
    accumulation, half the memory), else float32 (on CUDA ``amp`` is float16 autocast of the trunk)."""
    return torch.bfloat16 if amp and torch.device(device).type == "cpu" else torch.float32


class _DistanceRows:
    """Row blocks (and single entries, when the scores offer them) of ``score_to_distance(scores)``."""

    def __init__(self, score_rows: ScoreRows) -> None:
        self.score_rows = score_rows
        if getattr(score_rows, "entries", None) is not None:
            self.entries = lambda r, c: score_to_distance(score_rows.entries(r, c))  # type: ignore

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return score_to_distance(self.score_rows(start, stop))


def score_to_distance(score: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """Bounded distance ``1 - sigmoid(score / temperature)`` in ``[0, 1]`` (input to re-ranking)."""
    return 1.0 - torch.sigmoid(torch.as_tensor(score).float() / temperature)


def _ids(records: Records) -> Tuple[np.ndarray, np.ndarray]:
    return (np.asarray([r.pid for r in records], dtype=np.int64),
            np.asarray([r.camid for r in records], dtype=np.int64))


def rank_metrics(distmat: Any, query: Records, gallery: Records, max_rank: int = 50) -> Dict[str, Any]:
    """Rank-1/5/10, mAP and mINP (fractions) of a ``[P, G]`` distance matrix (lower = better),
    Market-1501 protocol (:func:`qaconv_ext.evaluation.evaluate_rank`)."""
    q_pids, q_cams = _ids(query)
    g_pids, g_cams = _ids(gallery)
    cmc, mAP, mINP = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank, return_minp=True)
    at = lambda k: float(cmc[min(k, len(cmc)) - 1])  # noqa: E731
    return {"rank1": at(1), "rank5": at(5), "rank10": at(10), "mAP": float(mAP), "mINP": float(mINP),
            "cmc": [float(x) for x in cmc]}


def format_metrics(name: str, m: Dict[str, Any], width: int = 22) -> str:
    """One table row: ``name  R1  R5  R10  mAP  mINP`` in percent."""
    return (f"{name:<{width}}{100 * m['rank1']:>8.1f}{100 * m['rank5']:>8.1f}{100 * m['rank10']:>8.1f}"
            f"{100 * m['mAP']:>8.1f}{100 * m.get('mINP', math.nan):>8.1f}")


def _distance_by_rows(score: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """:func:`score_to_distance` of a large matrix, a block of rows at a time (no full-size temporaries)."""
    score = torch.as_tensor(score)
    out = torch.empty(score.shape, dtype=torch.float32)
    for s, e in blocks(score.shape[0], rows):
        out[s:e] = score_to_distance(score[s:e])
    return out


def rerank_distance(score_qg: torch.Tensor, score_qq: torch.Tensor, score_gg: Union[torch.Tensor, ScoreRows],
                    k1: int = 20, k2: int = 6, lambda_value: float = 0.3, mode: str = "dense",
                    progress: Optional[bool] = None) -> np.ndarray:
    """k-reciprocal re-ranking of QAConv scores: distances ``1 - sigmoid(score / 10)`` of the three
    blocks go into :func:`qaconv_ext.postprocess.k_reciprocal_rerank`; returns ``[P, G]`` distances.

    ``score_gg`` is the ``[G, G]`` matrix or a callable ``rows(start, stop)`` returning its rows (e.g.
    :func:`score_rows`, whose ``entries(r, c)`` also serves single look-ups); with ``mode="sparse"`` and a
    callable, no ``[G, G]`` matrix is ever held (the query-gallery distances are converted a block of
    rows at a time as well).
    """
    check_rerank_mode(mode)
    if callable(score_gg):
        dist_gg: Any = _DistanceRows(score_gg)
    else:
        dist_gg = score_to_distance(score_gg)
    dist_qg = _distance_by_rows(score_qg) if mode == "sparse" else score_to_distance(score_qg)
    return k_reciprocal_rerank(dist_qg, score_to_distance(score_qq), dist_gg, k1=k1, k2=k2,
                               lambda_value=lambda_value, mode=mode, progress=progress)


def tlift_distance(dist: Any, query: Records, gallery: Records, tau: float = 100, sigma: float = 200,
                   K: int = 10, alpha: float = 0.2) -> np.ndarray:
    """TLift on the similarity ``1 - dist`` (e.g. a re-ranked distance); returns ``1 - lifted`` as
    distances. Needs ``.time`` on every record."""
    if any(r.time is None for r in list(query) + list(gallery)):
        raise ValueError("TLift needs time stamps on every query and gallery record")
    score = 1.0 - np.asarray(dist, dtype=np.float32)
    lifted = tlift(score, np.asarray([r.camid for r in gallery]), np.asarray([r.time for r in gallery]),
                   np.asarray([r.camid for r in query]), np.asarray([r.time for r in query]),
                   tau=tau, sigma=sigma, K=K, alpha=alpha)
    return (1.0 - np.asarray(lifted, dtype=np.float32)).astype(np.float32)


@dataclass
class QAConvEvaluation:
    """What :func:`evaluate_qaconv` returns.

    ``rows``: ``{row name: metrics}`` (:func:`rank_metrics`), the ``"QAConv"`` row and, when asked, the
    re-ranking and TLift rows, in that order. ``scores``: the QAConv logits as CPU float32 tensors,
    ``"qg"`` ``[P, N]`` and, when re-ranking, ``"qq"`` ``[P, P]`` and (``rerank_mode="dense"`` only)
    ``"gg"`` ``[N, N]``.
    """

    rows: Dict[str, Dict[str, Any]]
    scores: Dict[str, torch.Tensor]


def evaluate_scores(s_qg: torch.Tensor, query: Records, gallery: Records, *,
                    s_qq: Optional[torch.Tensor] = None, s_gg: Union[torch.Tensor, ScoreRows, None] = None,
                    rerank: bool = False, tlift: bool = False, tlift_params: Optional[Dict[str, float]] = None,
                    rerank_mode: str = "dense", progress: bool = True) -> QAConvEvaluation:
    """Scores in, rows out: the metrics of QAConv logits ``s_qg [P, G]`` and, with ``rerank`` (implied by
    ``tlift``), of k-reciprocal re-ranking and TLift (skipped without time stamps).

    Re-ranking needs the query-query logits ``s_qq [P, P]`` and the gallery-gallery ones ``s_gg``: the
    ``[G, G]`` matrix, or (``rerank_mode="sparse"``) a callable ``rows(start, stop)`` such as
    :func:`~qaconv_ext.scoring.score_rows`, so that no ``[G, G]`` matrix exists. One process
    (:func:`evaluate_qaconv_features`) and ``torchrun`` (rank 0 of
    :func:`qaconv_ext.distributed.sharded_evaluate_qaconv`) call this after their scoring.
    """
    check_rerank_mode(rerank_mode)
    results: Dict[str, Any] = {QACONV_ROW: rank_metrics(-s_qg, query, gallery)}
    scores: Dict[str, torch.Tensor] = {"qg": s_qg}
    if rerank or tlift:
        if s_qq is None or s_gg is None:
            raise ValueError("re-ranking needs the query-query scores s_qq and the gallery-gallery scores s_gg")
        scores["qq"] = s_qq
        if isinstance(s_gg, torch.Tensor):
            scores["gg"] = s_gg
        d_rr = rerank_distance(s_qg, s_qq, s_gg, mode=rerank_mode, progress=None if progress else False)
        results[RR_ROW] = rank_metrics(d_rr, query, gallery)
        if tlift and all(r.time is not None for r in list(query) + list(gallery)):
            d_tl = tlift_distance(d_rr, query, gallery, **(tlift_params or {}))
            results[TLIFT_ROW] = rank_metrics(d_tl, query, gallery)
    return QAConvEvaluation(rows=results, scores=scores)


def evaluate_qaconv_features(head: nn.Module, q_fea: torch.Tensor, g_fea: torch.Tensor, query: Records,
                             gallery: Records, *, rerank: bool = False, tlift: bool = False,
                             tlift_params: Optional[Dict[str, float]] = None, rerank_mode: str = "dense",
                             progress: bool = True, gallery_chunk: int = 2048) -> QAConvEvaluation:
    """The scoring and metrics of :func:`evaluate_qaconv` from extracted feature maps ``q_fea [P, ...]``,
    ``g_fea [N, ...]`` (on the device that scores them) and the records of their images.

    ``rerank_mode="sparse"`` feeds re-ranking the gallery-gallery rows from the fused op in blocks
    (:func:`~qaconv_ext.scoring.score_rows`), so no ``[N, N]`` matrix exists: memory ``O(P * N)``
    instead of ``O((P + N)^2)``; the distances equal the dense mode's up to float32 rounding.
    """
    check_rerank_mode(rerank_mode)
    s_qg = score_blocks(head, q_fea, g_fea, progress=progress, gallery_chunk=gallery_chunk)
    s_qq = s_gg = None
    if rerank or tlift:
        s_qq = self_score_blocks(head, q_fea, progress=progress, desc="QAConv query-query")
        s_gg = (score_rows(head, g_fea) if rerank_mode == "sparse" else
                self_score_blocks(head, g_fea, progress=progress, desc="QAConv gallery-gallery"))
    return evaluate_scores(s_qg, query, gallery, s_qq=s_qq, s_gg=s_gg, rerank=rerank, tlift=tlift,
                           tlift_params=tlift_params, rerank_mode=rerank_mode, progress=progress)


def evaluate_qaconv(backbone: nn.Module, head: nn.Module, query: Records, gallery: Records, height: int,
                    width: int, *, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
                    workers: int = 0, rerank: bool = False, tlift: bool = False,
                    tlift_params: Optional[Dict[str, float]] = None, rerank_mode: str = "dense",
                    progress: bool = True, gallery_chunk: int = 2048,
                    amp: Optional[bool] = None, preprocess: str = DEFAULT_PRESET) -> QAConvEvaluation:
    """Extract features, score every query against the gallery with the fused op, compute metrics.

    Returns a :class:`QAConvEvaluation`: the rows ``"QAConv"`` (and ``"QAConv + RR"``,
    ``"QAConv + RR + TLift"``) and the scores they were computed from. ``tlift`` implies ``rerank``
    (the paper's pipeline) and is skipped without time stamps. ``rerank_mode``: ``"dense"`` builds the
    gallery-gallery score matrix; ``"sparse"`` streams its rows from the fused op (memory-bounded,
    see :func:`evaluate_qaconv_features`). ``amp``: reduced precision -- on CUDA (on by default) the
    trunk runs under float16 autocast; on the CPU (off by default) the feature maps are kept in
    bfloat16 and the fused op scores them with float32 accumulation, in half the memory.
    ``preprocess``: the model's input preset. The modules' training modes are left as they are.
    """
    check_rerank_mode(rerank_mode)
    device = torch.device(device)
    backbone, head = backbone.to(device), head.to(device)
    dtype = feature_dtype(amp, device)
    q_fea, g_fea = (extract_features(backbone, recs, height, width, batch_size, device, workers, progress, desc,
                                     amp=amp, out_device=device, dtype=dtype, preprocess=preprocess)
                    for recs, desc in ((query, "query features"), (gallery, "gallery features")))
    return evaluate_qaconv_features(head, q_fea, g_fea, query, gallery, rerank=rerank, tlift=tlift,
                                    tlift_params=tlift_params, rerank_mode=rerank_mode, progress=progress,
                                    gallery_chunk=gallery_chunk)


def evaluate_baseline(backbone: nn.Module, query: Records, gallery: Records, height: int, width: int, *,
                      batch_size: int = 64, device: Union[str, torch.device] = "cpu", workers: int = 0,
                      progress: bool = True, preprocess: str = DEFAULT_PRESET) -> Dict[str, Any]:
    """The GAP + cosine baseline: pooled, L2-normalised features, distance ``1 - cos``."""
    model = GAPCosine(backbone).to(device)
    q, g = (extract_features(model, recs, height, width, batch_size, device, workers, progress, desc,
                             preprocess=preprocess)
            for recs, desc in ((query, "query features"), (gallery, "gallery features")))
    return rank_metrics(1.0 - q @ g.t(), query, gallery)
