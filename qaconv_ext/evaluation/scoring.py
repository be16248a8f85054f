"""Gallery-scale evaluation: feature extraction, QAConv scoring with the fused op, metrics.

Scores are QAConv logits (higher = more similar), computed by :func:`qaconv_ext.qaconv_score` with
the head folded into the kernel epilogue, in chunks with a progress bar. Ranking uses the
distance ``-score`` (float32). Re-ranking and TLift work on bounded values: the distance
``1 - sigmoid(score / 10)`` goes into k-reciprocal re-ranking, and TLift lifts the similarity
``1 - re-ranked distance``, as in the public QAConv evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..ops.dtypes import accumulation_dtype

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
    "evaluate_qaconv",
    "evaluate_qaconv_features",
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

ScoreRows = Callable[[int, int], torch.Tensor]


def extract_features(model: nn.Module, records: Records, height: int, width: int, batch_size: int = 64,
                     device: Union[str, torch.device] = "cpu", workers: int = 0, progress: bool = True,
                     desc: str = "features", amp: Optional[bool] = None,
                     out_device: Union[str, torch.device] = "cpu", preprocess: Optional[str] = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run ``model`` (eval mode, no grad) over the images of ``records`` -> ``[N, ...]`` in ``dtype``.

    ``records`` are :class:`~qaconv_ext.data.Record` s or image paths; images are resized to
    ``height x width`` and scaled with the test transform of ``preprocess`` (default: the model's
    ``preprocess`` attribute, which training and checkpoint loading set, else ``"public"``).
    ``amp``: fp16 autocast on CUDA (default on for CUDA). The result is on ``out_device``, each batch
    converted to ``dtype`` as it is produced (``torch.bfloat16`` halves the memory of stored maps).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data import ImageDataset, build_test_transform

    device = torch.device(device)
    use_amp = bool(device.type == "cuda" if amp is None else amp) and device.type == "cuda"
    preprocess = preprocess or getattr(model, "preprocess", None) or "public"
    loader = DataLoader(ImageDataset(list(records), build_test_transform(height, width, preprocess)),
                        batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    parts: List[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                    out = model(batch[0].to(device, non_blocking=True))
                parts.append(out.to(out_device, dtype))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("extract_features: no images")
    return torch.cat(parts)


def _blocks(n: int, size: int) -> List[Tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, max(1, size))]


def score_blocks(head: nn.Module, query_fea: torch.Tensor, gallery_fea: torch.Tensor,
                 query_chunk: int = 512, gallery_chunk: int = 2048, progress: bool = True,
                 desc: str = "QAConv scores", device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """QAConv logits ``[P, N]`` (float32, CPU) of every query against every gallery image: the op
    :func:`qaconv_ext.qaconv_score` with the folded head, called block by block.

    Works in ``query_chunk x gallery_chunk`` blocks (on ``device``, default: the features' device)
    so that only the features and one block of scores are resident on the device.
    """
    from tqdm.auto import tqdm

    from ..ops import qaconv_score

    device = torch.device(device) if device is not None else query_fea.device
    weight, bias = _folded(head, device, query_fea.dtype)
    P, N = query_fea.shape[0], gallery_fea.shape[0]
    out = torch.empty(P, N, dtype=torch.float32)
    bar = tqdm(total=P * N, desc=desc, unit="pair", unit_scale=True, leave=False, disable=not progress,
               dynamic_ncols=True)
    with torch.no_grad():
        for g0, g1 in _blocks(N, gallery_chunk):
            g = gallery_fea[g0:g1].to(device, non_blocking=True)
            for q0, q1 in _blocks(P, query_chunk):
                q = query_fea[q0:q1].to(device, non_blocking=True)
                out[q0:q1, g0:g1] = qaconv_score(q, g, weight, bias).float().cpu()
                bar.update((q1 - q0) * (g1 - g0))
    bar.close()
    return out


def self_score_blocks(head: nn.Module, fea: torch.Tensor, chunk: int = 1024, progress: bool = True,
                      desc: str = "QAConv self scores", device: Union[str, torch.device, None] = None
                      ) -> torch.Tensor:
    """QAConv logits ``[N, N]`` among one set (e.g. gallery-gallery for re-ranking), block by block
    like :func:`score_blocks`.

    With the symmetric ``v2`` head only the blocks on and above the diagonal are computed and mirrored
    (about half the pairs); other heads compute every block.
    """
    from tqdm.auto import tqdm

    from ..ops import qaconv_score

    if getattr(head, "layout", "eccv") != "v2":
        return score_blocks(head, fea, fea, chunk, chunk, progress, desc, device)
    device = torch.device(device) if device is not None else fea.device
    weight, bias = _folded(head, device, fea.dtype)
    N = fea.shape[0]
    out = torch.empty(N, N, dtype=torch.float32)
    blocks = _blocks(N, chunk)
    total = sum((b1 - b0) * (a1 - a0) for i, (a0, a1) in enumerate(blocks) for (b0, b1) in blocks[i:])
    bar = tqdm(total=total, desc=desc, unit="pair", unit_scale=True, leave=False, disable=not progress,
               dynamic_ncols=True)
    with torch.no_grad():
        for i, (a0, a1) in enumerate(blocks):
            a = fea[a0:a1].to(device, non_blocking=True)
            for b0, b1 in blocks[i:]:
                b = fea[b0:b1].to(device, non_blocking=True)
                s = qaconv_score(a, b, weight, bias).float().cpu()
                out[a0:a1, b0:b1] = s
                if b0 != a0:
                    out[b0:b1, a0:a1] = s.t()
                bar.update((a1 - a0) * (b1 - b0))
    bar.close()
    return out


def score_rows(head: nn.Module, fea: torch.Tensor, gallery_chunk: int = 8192,
               device: Union[str, torch.device, None] = None) -> ScoreRows:
    """``rows(start, stop)`` -> QAConv logits ``[stop - start, N]`` (float32, CPU) of ``fea[start:stop]``
    against all of ``fea``, computed on demand by :func:`qaconv_ext.qaconv_score` with the folded head
    (``gallery_chunk`` maps per call). Feeds the memory-bounded re-ranking: the ``[N, N]`` matrix
    never exists, only the row blocks asked for."""
    from ..ops import qaconv_score

    device = torch.device(device) if device is not None else fea.device
    weight, bias = _folded(head, device, fea.dtype)
    N = fea.shape[0]
    blocks = _blocks(N, gallery_chunk)

    def rows(start: int, stop: int) -> torch.Tensor:
        out = torch.empty(stop - start, N, dtype=torch.float32)
        with torch.no_grad():
            a = fea[start:stop].to(device, non_blocking=True)
            for g0, g1 in blocks:
                out[:, g0:g1] = qaconv_score(a, fea[g0:g1].to(device, non_blocking=True), weight, bias).float().cpu()
        return out

    def entries(r: np.ndarray, c: np.ndarray) -> torch.Tensor:
        """The single logits ``[r[i], c[i]]`` (the same values as in ``rows``), one call per distinct row."""
        r_t, c_t = torch.as_tensor(np.asarray(r), dtype=torch.int64), torch.as_tensor(np.asarray(c), dtype=torch.int64)
        out = torch.empty(r_t.shape[0], dtype=torch.float32)
        if r_t.numel() == 0:
            return out
        order = torch.argsort(r_t, stable=True)
        rs, counts = torch.unique_consecutive(r_t[order], return_counts=True)
        with torch.no_grad():
            at = 0
            for row, n in zip(rs.tolist(), counts.tolist()):
                sel = order[at:at + n]
                out[sel] = qaconv_score(fea[row:row + 1].to(device), fea[c_t[sel]].to(device), weight, bias
                                        ).float().cpu().reshape(-1)
                at += n
        return out

    rows.entries = entries  # type: ignore[attr-defined]
    return rows


class _DistanceRows:
    """Row blocks (and single entries, when the scores offer them) of ``score_to_distance(scores)``."""

    def __init__(self, score_rows: ScoreRows) -> None:
        self.score_rows = score_rows
        if getattr(score_rows, "entries", None) is not None:
            self.entries = lambda r, c: score_to_distance(score_rows.entries(r, c))  # type: ignore

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return score_to_distance(self.score_rows(start, stop))


def _folded(head: nn.Module, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    head.eval()
    with torch.no_grad():
        weight, bias = head.folded()
    wdtype = accumulation_dtype(dtype)
    return weight.detach().to(device, wdtype), bias.detach().to(device, wdtype)


def score_to_distance(score: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """Bounded distance ``1 - sigmoid(score / temperature)`` in ``[0, 1]`` (input to re-ranking)."""
    return 1.0 - torch.sigmoid(torch.as_tensor(score).float() / temperature)


def _ids(records: Records) -> Tuple[np.ndarray, np.ndarray]:
    return (np.asarray([r.pid for r in records], dtype=np.int64),
            np.asarray([r.camid for r in records], dtype=np.int64))


def rank_metrics(distmat: Any, query: Records, gallery: Records, max_rank: int = 50) -> Dict[str, Any]:
    """Rank-1/5/10, mAP and mINP (fractions) of a ``[P, G]`` distance matrix (lower = better),
    Market-1501 protocol (:func:`qaconv_ext.evaluation.evaluate_rank`)."""
    from .metrics import evaluate_rank

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
    for s, e in _blocks(score.shape[0], rows):
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
    from ..postprocess import k_reciprocal_rerank

    if mode not in RERANK_MODES:
        raise ValueError(f"mode: expected one of {RERANK_MODES}, got {mode!r}")
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
    from ..postprocess import tlift

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


def evaluate_qaconv_features(head: nn.Module, q_fea: torch.Tensor, g_fea: torch.Tensor, query: Records,
                             gallery: Records, *, rerank: bool = False, tlift: bool = False,
                             tlift_params: Optional[Dict[str, float]] = None, rerank_mode: str = "dense",
                             progress: bool = True, gallery_chunk: int = 2048) -> QAConvEvaluation:
    """The scoring and metrics of :func:`evaluate_qaconv` from extracted feature maps ``q_fea [P, ...]``,
    ``g_fea [N, ...]`` (on the device that scores them) and the records of their images.

    ``rerank_mode="sparse"`` feeds re-ranking the gallery-gallery rows from the fused op in blocks
    (:func:`score_rows`), so no ``[N, N]`` matrix exists: memory ``O(P * N)`` instead of
    ``O((P + N)^2)``; the distances equal the dense mode's up to float32 rounding.
    """
    if rerank_mode not in RERANK_MODES:
        raise ValueError(f"rerank_mode: expected one of {RERANK_MODES}, got {rerank_mode!r}")
    s_qg = score_blocks(head, q_fea, g_fea, progress=progress, gallery_chunk=gallery_chunk)
    results: Dict[str, Any] = {QACONV_ROW: rank_metrics(-s_qg, query, gallery)}
    scores = {"qg": s_qg}
    if rerank or tlift:
        s_qq = self_score_blocks(head, q_fea, progress=progress, desc="QAConv query-query")
        scores.update(qq=s_qq)
        if rerank_mode == "sparse":
            s_gg: Union[torch.Tensor, ScoreRows] = score_rows(head, g_fea)
        else:
            s_gg = self_score_blocks(head, g_fea, progress=progress, desc="QAConv gallery-gallery")
            scores.update(gg=s_gg)
        d_rr = rerank_distance(s_qg, s_qq, s_gg, mode=rerank_mode, progress=None if progress else False)
        del s_gg
        results[RR_ROW] = rank_metrics(d_rr, query, gallery)
        if tlift and all(r.time is not None for r in list(query) + list(gallery)):
            d_tl = tlift_distance(d_rr, query, gallery, **(tlift_params or {}))
            results[TLIFT_ROW] = rank_metrics(d_tl, query, gallery)
    return QAConvEvaluation(rows=results, scores=scores)


def evaluate_qaconv(backbone: nn.Module, head: nn.Module, query: Records, gallery: Records, height: int,
                    width: int, *, batch_size: int = 64, device: Union[str, torch.device] = "cpu",
                    workers: int = 0, rerank: bool = False, tlift: bool = False,
                    tlift_params: Optional[Dict[str, float]] = None, rerank_mode: str = "dense",
                    progress: bool = True, gallery_chunk: int = 2048,
                    amp: Optional[bool] = None) -> QAConvEvaluation:
    """Extract features, score every query against the gallery with the fused op, compute metrics.

    Returns a :class:`QAConvEvaluation`: the rows ``"QAConv"`` (and ``"QAConv + RR"``,
    ``"QAConv + RR + TLift"``) and the scores they were computed from. ``tlift`` implies ``rerank``
    (the paper's pipeline) and is skipped without time stamps. ``rerank_mode``: ``"dense"`` builds the
    gallery-gallery score matrix; ``"sparse"`` streams its rows from the fused op (memory-bounded,
    see :func:`evaluate_qaconv_features`). ``amp``: reduced precision -- on CUDA (on by default) the
    trunk runs under float16 autocast; on the CPU (off by default) the feature maps are kept in
    bfloat16 and the fused op scores them with float32 accumulation, in half the memory.
    """
    if rerank_mode not in RERANK_MODES:
        raise ValueError(f"rerank_mode: expected one of {RERANK_MODES}, got {rerank_mode!r}")
    device = torch.device(device)
    backbone = backbone.to(device)
    head = head.to(device).eval()
    fea_dev = device  # the scorer moves blocks to the device; keep features there when it is a GPU
    fea_dtype = torch.bfloat16 if amp and device.type == "cpu" else torch.float32
    q_fea = extract_features(backbone, query, height, width, batch_size, device, workers, progress,
                             "query features", amp=amp, out_device=fea_dev, dtype=fea_dtype)
    g_fea = extract_features(backbone, gallery, height, width, batch_size, device, workers, progress,
                             "gallery features", amp=amp, out_device=fea_dev, dtype=fea_dtype)
    return evaluate_qaconv_features(head, q_fea, g_fea, query, gallery, rerank=rerank, tlift=tlift,
                                    tlift_params=tlift_params, rerank_mode=rerank_mode, progress=progress,
                                    gallery_chunk=gallery_chunk)


def evaluate_baseline(backbone: nn.Module, query: Records, gallery: Records, height: int, width: int, *,
                      batch_size: int = 64, device: Union[str, torch.device] = "cpu", workers: int = 0,
                      progress: bool = True) -> Dict[str, Any]:
    """The GAP + cosine baseline: pooled, L2-normalised features, distance ``1 - cos``."""
    from ..models.baseline import GAPCosine

    model = GAPCosine(backbone).to(device)
    q = extract_features(model, query, height, width, batch_size, device, workers, progress, "query features")
    g = extract_features(model, gallery, height, width, batch_size, device, workers, progress, "gallery features")
    return rank_metrics(1.0 - q @ g.t(), query, gallery)
