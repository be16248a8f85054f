"""What the picture commands share beyond drawing: ranking one query against a gallery with a trained
QAConv model (``qaconv rank``, the demo) and the demo's pictures.

The drawing itself is :mod:`qaconv_ext.viz`; this module scores, picks and saves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["QueryRanking", "rank_query", "save_demo_pictures"]


@dataclass(frozen=True)
class QueryRanking:
    """One query ranked against a gallery by QAConv score.

    ``features``: the query's feature map ``[1, d, h, w]``; ``scores``: its QAConv logit against every
    gallery image ``[N]``; ``junk``: the gallery entries the Market-1501 protocol ignores (same
    identity and camera); ``matches``: the same identity ``[N]``; ``order``: gallery indices best
    first, junk left out.
    """

    features: torch.Tensor
    scores: np.ndarray
    junk: np.ndarray
    matches: np.ndarray
    order: np.ndarray

    @property
    def top_is_match(self) -> bool:
        """Whether the best-ranked gallery image is a true match."""
        return bool(len(self.order)) and bool(self.matches[self.order[0]])


def rank_query(model: torch.nn.Module, head: torch.nn.Module, query: Any, gallery: Sequence[Any],
               gallery_features: torch.Tensor, height: int, width: int,
               device: Union[str, torch.device] = "cpu", *, preprocess: str) -> QueryRanking:
    """Rank ``gallery`` (records with ``pid``/``camid``, features ``gallery_features``) for the record
    ``query``: its features by ``model`` at ``height x width`` with the input preset ``preprocess`` on
    ``device``, QAConv scores by ``head``."""
    from ..evaluation import extract_features, junk_mask, score_blocks
    from ..viz import rank_gallery

    g_pid = np.array([g.pid for g in gallery])
    g_cam = np.array([g.camid for g in gallery])
    q_fea = extract_features(model, [query], height, width, device=device, progress=False, preprocess=preprocess)
    scores = score_blocks(head, q_fea, gallery_features, progress=False)[0].numpy()
    junk = junk_mask(query.pid, query.camid, g_pid, g_cam)
    return QueryRanking(q_fea, scores, junk, g_pid == query.pid, rank_gallery(scores, None, True, junk))


def _model_device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def save_demo_pictures(model: torch.nn.Module, head: torch.nn.Module, dataset: Any, out_dir: str, *,
                       height: Optional[int] = None, width: Optional[int] = None,
                       query_index: Optional[int] = None, k: int = 10, max_lines: int = 40,
                       batch_size: int = 64, preprocess: str) -> List[str]:
    """Save a ranked list and two correspondence pictures for one query of ``dataset``.

    ``dataset`` has ``.query`` and ``.gallery`` record lists (e.g. ``Market1501`` on a synthetic
    domain); ``model`` maps images to L2-normalised feature maps, ``head`` is the QAConv head.
    ``height``/``width`` is the network input size (default: the query image's own size),
    ``preprocess`` the model's input preset.
    The query is ``query_index``, or else the first query whose best-scored gallery image is a true
    match (the first with a true match in another camera if none is).
    Writes ``ranked_list.png``, ``correspondences_match.png`` (the query and its best-scored true
    match), ``correspondences_nonmatch.png`` (its best-scored impostor) and ``overview.png`` (the
    three in one picture) into ``out_dir``; returns their paths. Lines show head contributions above
    the query's average match over the gallery (:func:`qaconv_ext.viz.relative_contributions`); the two
    correspondence pictures share one colour scale.
    """
    from ..evaluation import extract_features, junk_mask
    from ..viz import (
        average_match,
        draw_correspondences,
        draw_ranked_list,
        load_image,
        match_pair,
        relative_contributions,
        stack_pictures,
    )

    query, gallery = list(dataset.query), list(dataset.gallery)
    if not query or not gallery:
        raise ValueError("save_demo_pictures: the dataset needs query and gallery images")
    g_pid = np.array([g.pid for g in gallery])
    g_cam = np.array([g.camid for g in gallery])
    if query_index is not None and not 0 <= int(query_index) < len(query):
        raise IndexError(f"query_index {query_index} out of range: the dataset has {len(query)} queries")
    if height is None or width is None:
        w0, h0 = load_image(query[int(query_index or 0)], "query").size
        height, width = height or h0, width or w0
    device = _model_device(model)
    g_fea = extract_features(model, gallery, height, width, batch_size=batch_size, device=device, progress=False,
                             preprocess=preprocess)

    def ranked(i: int) -> QueryRanking:
        return rank_query(model, head, query[i], gallery, g_fea, height, width, device, preprocess=preprocess)

    if query_index is None:  # a typical success: the first query whose rank-1 image is a true match
        chosen = None
        for i, qi in enumerate(query):
            if not np.any((g_pid == qi.pid) & ~junk_mask(qi.pid, qi.camid, g_pid, g_cam)):
                continue
            r = ranked(i)
            if chosen is None or (r.top_is_match and not chosen[1].top_is_match):
                chosen = (i, r)
            if r.top_is_match:
                break
        query_index, ranking = chosen if chosen else (0, ranked(0))
    else:
        ranking = ranked(int(query_index))
    q = query[int(query_index)]
    q_fea, scores, junk, matches, order = (ranking.features, ranking.scores, ranking.junk, ranking.matches,
                                           ranking.order)

    os.makedirs(out_dir, exist_ok=True)
    paths: List[str] = []
    n_rel = int(np.sum(matches & ~junk))
    title = (f"query {int(query_index)} (id {q.pid}, camera {q.camid + 1}): top {min(k, len(order))} of "
             f"{len(order)} gallery images by QAConv score; {n_rel} true match{'es' if n_rel != 1 else ''} "
             f"in the gallery")
    img = draw_ranked_list(q, gallery, scores, matches, k=k, ignore=junk, title=title)
    p = os.path.join(out_dir, "ranked_list.png")
    img.save(p)
    paths.append(p)

    picks = {}
    for name, want in (("correspondences_match.png", True), ("correspondences_nonmatch.png", False)):
        pick = next((int(i) for i in order if bool(matches[i]) == want), None)
        if pick is not None:
            picks[name] = pick
    # Contributions relative to the query's average match over the gallery; one colour scale for both
    # pictures, so their line colours compare.
    reference = average_match(q_fea, g_fea)
    kept = []
    for pick in picks.values():
        c = relative_contributions(match_pair(q_fea[0], g_fea[pick])[0], reference, head)
        kept.append(torch.sort(c, descending=True).values[:max(1, max_lines)])
    vmin = float(min(t.min() for t in kept)) if kept else None
    vmax = float(max(t.max() for t in kept)) if kept else None
    pictures = [img]
    for name, pick in picks.items():
        img = draw_correspondences(q, gallery[pick], q_fea[0], g_fea[pick], head=head, reference=reference,
                                   max_lines=max_lines, image_size=(height, width), vmin=vmin, vmax=vmax)
        p = os.path.join(out_dir, name)
        img.save(p)
        paths.append(p)
        pictures.append(img)
    p = os.path.join(out_dir, "overview.png")
    stack_pictures([pictures[1:], pictures[:1]]).save(p)
    paths.append(p)
    return paths
