"""Ranked lists (a query and its top-k gallery images), and pictures stacked into one."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .correspondences import Color, ImageInput, _font, _wrap, load_image

__all__ = [
    "RankCell",
    "rank_gallery",
    "draw_ranked_list",
    "stack_pictures",
]


@dataclass(frozen=True)
class RankCell:
    """One gallery cell of a ranked-list picture: 1-based ``rank``, gallery ``index``, ``score``,
    ``match`` (True/False, None when unknown) and the frame's ``box`` ``(x0, y0, x1, y1)``
    (inclusive) in the picture."""

    rank: int
    index: int
    score: float
    match: Optional[bool]
    box: Tuple[int, int, int, int]


def _vector(x: Any, name: str, n: Optional[int] = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected one value per gallery image (1-D), got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: has {arr.shape[0]} entries but the gallery has {n} images")
    return arr


def rank_gallery(scores: Any, k: Optional[int] = None, higher_is_better: bool = True,
                 ignore: Any = None) -> np.ndarray:
    """Gallery indices sorted best first (stable: equal scores keep gallery order), the top ``k``.

    ``ignore`` is an optional boolean mask of gallery entries to leave out (e.g. the query's own
    camera's images of its identity, the Market-1501 junk); NaN scores are ranked last.
    """
    s = _vector(scores, "scores").astype(np.float64)
    key = -s if higher_is_better else s.copy()
    key[np.isnan(key)] = np.inf
    order = np.argsort(key, kind="stable")
    if ignore is not None:
        mask = _vector(ignore, "ignore", s.shape[0]).astype(bool)
        order = order[~mask[order]]
    return order if k is None else order[:max(0, int(k))]


def _caption_of(item: Any) -> Optional[str]:
    pid, cam = getattr(item, "pid", None), getattr(item, "camid", None)
    if pid is None:
        return None
    return f"id {pid}" + (f" c{cam + 1}" if cam is not None else "")


def draw_ranked_list(query: ImageInput, gallery: Sequence[ImageInput], scores: Any, matches: Any = None,
                     k: int = 10, *, higher_is_better: bool = True, ignore: Any = None,
                     query_caption: Optional[str] = None, gallery_captions: Optional[Sequence[str]] = None,
                     title: Optional[str] = None, cell_height: int = 160, frame: int = 4, spacing: int = 6,
                     font_size: int = 13, score_format: str = "{:.3f}",
                     true_color: Color = (0, 170, 60), false_color: Color = (220, 30, 30),
                     unknown_color: Color = (160, 160, 160), query_color: Color = (40, 90, 210),
                     background: Color = (255, 255, 255), return_cells: bool = False
                     ) -> Union["PIL.Image.Image", Tuple["PIL.Image.Image", List[RankCell]]]:  # noqa: F821
    """Draw a query and its top-``k`` gallery images with their scores.

    Args:
        query: the query image (path, PIL image, array, or a record with ``.path``).
        gallery: the gallery images, same kinds; only the top ``k`` are read.
        scores: one score per gallery image (``[N]``; higher = better unless ``higher_is_better=False``,
            e.g. for distances).
        matches: optional ``[N]`` booleans, True for a true match: framed ``true_color`` (green),
            others ``false_color`` (red). When None and the query and gallery items carry ``pid``
            (records), a match is an equal pid; otherwise frames are ``unknown_color``.
        k: how many gallery images to show.
        ignore: optional ``[N]`` boolean mask of gallery entries not to rank (e.g. junk).
        query_caption, gallery_captions: text under the images (records default to "id P cC").
        title: a line above the list. cell_height, frame, spacing, font_size, score_format, colours:
            appearance.
        return_cells: also return the :class:`RankCell` list (rank, index, score, match, frame box).

    Returns:
        the ``PIL.Image`` (and the cells).
    """
    from PIL import Image, ImageDraw

    n = len(gallery)
    s = _vector(scores, "scores", n).astype(np.float64)
    if matches is None and getattr(query, "pid", None) is not None and n and \
            all(getattr(g, "pid", None) is not None for g in gallery):
        m: Optional[np.ndarray] = np.array([g.pid == query.pid for g in gallery], dtype=bool)
    elif matches is not None:
        m = _vector(matches, "matches", n).astype(bool)
    else:
        m = None
    if gallery_captions is not None and len(gallery_captions) != n:
        raise ValueError(f"gallery_captions: has {len(gallery_captions)} entries but the gallery has {n} images")
    if int(k) < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    order = rank_gallery(s, k, higher_is_better, ignore)

    cell_height = int(cell_height)
    fr, sp = int(frame), int(spacing)
    font = _font(font_size)
    line_h = font_size + 4

    def fit(img):
        w = max(1, round(img.width * cell_height / img.height))
        return img.resize((w, cell_height), Image.BICUBIC)

    q_img = fit(load_image(query, "query"))
    g_imgs = [fit(load_image(gallery[int(i)], f"gallery[{int(i)}]")) for i in order]
    q_text = [query_caption if query_caption is not None else (_caption_of(query) or ""), "query"]
    g_texts = []
    for rank, i in enumerate(order, start=1):
        cap = gallery_captions[int(i)] if gallery_captions is not None else _caption_of(gallery[int(i)])
        g_texts.append([f"#{rank}  {score_format.format(s[int(i)])}", cap or ""])

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def cell_w(img, texts):
        tw = max((probe.textlength(t, font=font) for t in texts if t), default=0)
        return int(max(img.width + 2 * fr, math.ceil(tw) + 4))

    widths = [cell_w(q_img, q_text)] + [cell_w(im, t) for im, t in zip(g_imgs, g_texts)]
    sep = 3 * sp + 2  # wider gap plus a rule between the query and the gallery
    total_w = sp + widths[0] + sep + sum(w + sp for w in widths[1:])
    title_lines = _wrap(probe, title, font, max(total_w - 2 * sp, 50)) if title else []
    top = sp + len(title_lines) * line_h
    caps_h = 2 * line_h
    total_w = max(total_w, int(max((probe.textlength(t, font=font) for t in title_lines), default=0)) + 2 * sp)
    total_h = top + cell_height + 2 * fr + 4 + caps_h + sp
    canvas = Image.new("RGB", (total_w, total_h), tuple(background))
    draw = ImageDraw.Draw(canvas)
    y = sp
    for t in title_lines:
        draw.text((sp, y), t, fill=(0, 0, 0), font=font)
        y += line_h

    def put(x, w, img, color, texts):
        x0, y0 = x + (w - img.width - 2 * fr) // 2, top
        x1, y1 = x0 + img.width + 2 * fr - 1, y0 + img.height + 2 * fr - 1
        draw.rectangle([x0, y0, x1, y1], fill=tuple(color))
        canvas.paste(img, (x0 + fr, y0 + fr))
        ty = y1 + 4
        for t in texts:
            if t:
                tw = probe.textlength(t, font=font)
                draw.text((x + (w - tw) / 2, ty), t, fill=(0, 0, 0), font=font)
            ty += line_h
        return (x0, y0, x1, y1)

    x = sp
    put(x, widths[0], q_img, query_color, q_text)
    x += widths[0]
    rule_x = x + sep // 2
    draw.line([(rule_x, top), (rule_x, top + cell_height + 2 * fr)], fill=(120, 120, 120), width=2)
    x += sep
    cells: List[RankCell] = []
    for rank, (i, img, texts, w) in enumerate(zip(order, g_imgs, g_texts, widths[1:]), start=1):
        match = None if m is None else bool(m[int(i)])
        color = unknown_color if match is None else (true_color if match else false_color)
        box = put(x, w, img, color, texts)
        cells.append(RankCell(rank, int(i), float(s[int(i)]), match, box))
        x += w + sp
    return (canvas, cells) if return_cells else canvas


def stack_pictures(rows: Sequence[Sequence["PIL.Image.Image"]], gap: int = 16) -> "PIL.Image.Image":  # noqa: F821
    """Paste pictures row by row (left to right, top to bottom, ``gap`` pixels apart) onto one white
    canvas; empty rows are skipped."""
    from PIL import Image

    rows = [r for r in rows if r]
    width = max(sum(im.width for im in r) + gap * (len(r) - 1) for r in rows)
    height = sum(max(im.height for im in r) for r in rows) + gap * (len(rows) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for r in rows:
        x = 0
        for im in r:
            canvas.paste(im, (x, y))
            x += im.width + gap
        y += max(im.height for im in r) + gap
    return canvas
