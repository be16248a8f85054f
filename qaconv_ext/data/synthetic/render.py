"""Drawing the synthetic camera network's boxes: background scenes, pedestrians, occlusions and the
camera effects (colour cast, contrast, blur, noise, JPEG quality), one process or a pool; the
contact sheet of generated records.

Each box is drawn from its own seed (planned in :mod:`.plan`), so the files do not depend on the
number of rendering processes.
"""
from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..records import Record, read_image

@functools.lru_cache(maxsize=32)
def _scene(style_key: str) -> "Image.Image":  # noqa: F821
    """A camera's background scene at twice the output resolution (cached per process)."""
    from PIL import Image, ImageDraw

    style = json.loads(style_key)
    w2, h2 = style["w2"], style["h2"]
    rng = np.random.default_rng(style["bg_seed"])
    W, H = w2 * 3, int(h2 * 1.3)
    img = Image.new("RGB", (W, H), tuple(style["wall"]))
    d = ImageDraw.Draw(img)
    horizon = int(H * rng.uniform(0.45, 0.65))
    wall = np.array(style["wall"], dtype=float)
    floor = np.array(style["floor"], dtype=float)
    for y in range(horizon):  # soft vertical gradient on the wall
        c = wall * (0.9 + 0.2 * y / max(1, horizon))
        d.line([(0, y), (W, y)], fill=tuple(int(v) for v in np.clip(c, 0, 255)))
    for y in range(horizon, H):
        c = floor * (0.85 + 0.3 * (y - horizon) / max(1, H - horizon))
        d.line([(0, y), (W, y)], fill=tuple(int(v) for v in np.clip(c, 0, 255)))
    props = [tuple(p) for p in style["props"]]
    for _ in range(int(rng.integers(5, 9))):  # doors, windows, shop signs
        x = int(rng.uniform(0, W)); w = int(rng.uniform(0.15, 0.5) * w2)
        top = int(rng.uniform(0.05, 0.5) * horizon); bot = int(rng.uniform(top + 10, horizon))
        d.rectangle([x, top, x + w, bot], fill=props[rng.integers(len(props))],
                    outline=tuple(int(v * 0.6) for v in style["wall"]), width=2)
    for k in range(1, 8):  # floor tiles
        y = horizon + int((H - horizon) * (k / 8) ** 1.5)
        d.line([(0, y), (W, y)], fill=tuple(int(v * 0.8) for v in style["floor"]), width=1)
    for x in range(0, W, int(w2 * 0.6)):
        d.line([(x, horizon), (x + int(rng.uniform(-30, 30)), H)],
               fill=tuple(int(v * 0.85) for v in style["floor"]), width=1)
    return img


def _style_key(style: Dict[str, Any], w2: int, h2: int) -> str:
    keep = {k: style[k] for k in ("bg_seed", "wall", "floor", "props")}
    keep.update(w2=w2, h2=h2)
    return json.dumps(keep, sort_keys=True)


def _c(rgb: Sequence[int]) -> Tuple[int, int, int]:
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def _draw_logo(d, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    elif shape == "cross":
        t = r * 0.4
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    elif shape == "diamond":
        d.polygon([(cx, cy - r * 1.2), (cx + r, cy), (cx, cy + r * 1.2), (cx - r, cy)], fill=color)


def _draw_person(d, ident: Dict[str, Any], view: str, cx: float, y0: float, u: float,
                 swing: float) -> None:
    """Draw a stylised pedestrian of height ``u`` pixels with the top of the head at ``y0``."""
    front = view == "front"
    mirror = 1.0 if front else -1.0
    skin, hair = _c(ident["skin"]), _c(ident["hair"])
    upper, lower = _c(ident["upper"]), _c(ident["lower"])
    b = ident["build"]
    sw, hw = 0.125 * u * b, 0.095 * u * b
    ysh, yw, ycr = y0 + 0.17 * u, y0 + 0.50 * u, y0 + 0.54 * u
    yknee, yank = y0 + 0.73 * u, y0 + 0.94 * u
    tx = lambda y: sw + (hw - sw) * (y - ysh) / (yw - ysh)  # noqa: E731  torso half width at y
    legw = max(2, int(0.075 * u * b))
    armw = max(2, int(0.055 * u))

    # Ground shadow.
    d.ellipse([cx - 1.3 * hw, y0 + 0.97 * u, cx + 1.3 * hw, y0 + 1.03 * u], fill=(0, 0, 0, 60))

    # Long hair behind the shoulders (front view).
    if ident["hair_style"] == "long" and front:
        d.rectangle([cx - 0.07 * u, y0 + 0.05 * u, cx + 0.07 * u, y0 + 0.27 * u], fill=hair)

    # Legs.
    stride = swing * 0.07 * u
    for side, sgn in ((-1.0, 1.0), (1.0, -1.0)):
        hx = cx + side * 0.5 * hw
        ax = hx + sgn * stride
        kx = hx + (ax - hx) * (yknee - ycr) / (yank - ycr)
        if ident["lower_type"] == "trousers":
            d.line([(hx, ycr - 0.02 * u), (ax, yank)], fill=lower, width=legw)
        else:  # shorts / skirt: skin below the knee
            d.line([(hx, ycr), (ax, yank)], fill=skin, width=max(2, int(legw * 0.8)))
            if ident["lower_type"] == "shorts":
                d.line([(hx, ycr - 0.02 * u), (kx, yknee - 0.03 * u)], fill=lower, width=legw)
        if ident["side_stripe"] and ident["lower_type"] == "trousers":
            off = side * legw * 0.45
            d.line([(hx + off, ycr), (ax + off, yank)], fill=_c(ident["stripe_color"]),
                   width=max(1, int(0.015 * u)))
        d.ellipse([ax - 0.045 * u, yank - 0.012 * u, ax + 0.045 * u, yank + 0.045 * u],
                  fill=_c(ident["shoes"]))
    # Hips / skirt.
    if ident["lower_type"] == "skirt":
        d.polygon([(cx - hw, yw), (cx + hw, yw), (cx + 1.45 * hw, y0 + 0.70 * u),
                   (cx - 1.45 * hw, y0 + 0.70 * u)], fill=lower)
    else:
        d.rectangle([cx - hw, yw - 0.01 * u, cx + hw, ycr + 0.02 * u], fill=lower)

    # Torso and its pattern.
    d.polygon([(cx - sw, ysh), (cx + sw, ysh), (cx + hw, yw), (cx - hw, yw)], fill=upper)
    pc = _c(ident["pattern_color"])
    if ident["pattern"] == "stripes":
        n = ident["stripes"]
        band = (yw - ysh) / (2 * n + 1)
        for k in range(n):
            ya, yb = ysh + (2 * k + 1) * band, ysh + (2 * k + 2) * band
            d.polygon([(cx - tx(ya), ya), (cx + tx(ya), ya), (cx + tx(yb), yb), (cx - tx(yb), yb)],
                      fill=pc)
    elif ident["pattern"] == "split":
        s = mirror
        d.polygon([(cx, ysh), (cx + s * sw, ysh), (cx + s * hw, yw), (cx, yw)], fill=pc)
    elif ident["pattern"] == "band":
        ya, yb = y0 + 0.27 * u, y0 + 0.34 * u
        d.polygon([(cx - tx(ya), ya), (cx + tx(ya), ya), (cx + tx(yb), yb), (cx - tx(yb), yb)],
                  fill=pc)

    # Logo.
    if ident["logo"] != "none" and (ident["logo_side"] == "both"
                                    or ident["logo_side"] == view):
        pos = ident["logo_pos"]
        lx = {"centre": 0.0, "left": -0.5, "right": 0.5, "low": 0.0}[pos] * sw * mirror
        ly = y0 + (0.40 if pos == "low" else 0.27) * u
        _draw_logo(d, ident["logo"], cx + lx, ly, 0.04 * u, _c(ident["logo_color"]))

    # Bags.
    bag, bc = ident["bag"], _c(ident["bag_color"])
    if bag == "backpack":
        if front:
            for side in (-1.0, 1.0):
                d.line([(cx + side * 0.6 * sw, ysh), (cx + side * 0.55 * sw, ysh + 0.2 * u)],
                       fill=bc, width=max(1, int(0.022 * u)))
        else:
            d.rounded_rectangle([cx - 0.75 * sw, ysh + 0.03 * u, cx + 0.75 * sw, ysh + 0.27 * u],
                                radius=max(1, int(0.03 * u)), fill=bc)

    # Arms (swing opposite to the legs); sleeves in the garment colour.
    for side, sgn in ((-1.0, -1.0), (1.0, 1.0)):
        sx, sy = cx + side * (sw - 0.02 * u), ysh + 0.015 * u
        wx, wy = cx + side * (sw + 0.015 * u) + sgn * swing * 0.05 * u, y0 + 0.49 * u
        if ident["sleeves"] == "long":
            d.line([(sx, sy), (wx, wy)], fill=upper, width=armw)
        else:
            mx, my = sx + (wx - sx) * 0.38, sy + (wy - sy) * 0.38
            d.line([(mx, my), (wx, wy)], fill=skin, width=max(2, int(armw * 0.8)))
            d.line([(sx, sy), (mx, my)], fill=upper, width=armw)
        d.ellipse([wx - 0.022 * u, wy - 0.01 * u, wx + 0.022 * u, wy + 0.035 * u], fill=skin)
        if bag == "handbag" and side * mirror > 0:
            d.rectangle([wx - 0.045 * u, wy + 0.02 * u, wx + 0.045 * u, wy + 0.11 * u], fill=bc)

    if bag in ("shoulder_left", "shoulder_right"):
        s = (-1.0 if bag == "shoulder_left" else 1.0) * mirror
        bx = cx + s * (sw + 0.025 * u)
        d.line([(cx - s * 0.7 * sw, ysh), (bx, y0 + 0.43 * u)], fill=bc, width=max(1, int(0.02 * u)))
        d.rectangle([bx - 0.05 * u, y0 + 0.42 * u, bx + 0.05 * u, y0 + 0.54 * u], fill=bc)

    # Neck, head, hair.
    d.rectangle([cx - 0.025 * u, y0 + 0.11 * u, cx + 0.025 * u, ysh + 0.01 * u], fill=skin)
    head = [cx - 0.055 * u, y0, cx + 0.055 * u, y0 + 0.135 * u]
    if front:
        d.ellipse(head, fill=hair)
        d.ellipse([cx - 0.048 * u, y0 + 0.028 * u, cx + 0.048 * u, y0 + 0.135 * u], fill=skin)
    else:
        d.ellipse(head, fill=hair)
        if ident["hair_style"] == "long":
            d.rectangle([cx - 0.065 * u, y0 + 0.07 * u, cx + 0.065 * u, y0 + 0.27 * u], fill=hair)
    if ident["hair_style"] == "cap":
        cap = _c(ident["cap"])
        d.chord([cx - 0.058 * u, y0 - 0.01 * u, cx + 0.058 * u, y0 + 0.09 * u], 180, 360, fill=cap)
        if front:
            d.rectangle([cx - 0.06 * u, y0 + 0.035 * u, cx + 0.075 * u, y0 + 0.05 * u], fill=cap)


def _render(task: Dict[str, Any]) -> None:
    """Render one planned box to ``task['path']`` as a JPEG."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(task["seed"])
    w, h = task["width"], task["height"]
    w2, h2 = 2 * w, 2 * h
    style = task["style"]

    scene = _scene(_style_key(style, w2, h2))
    zoom = rng.uniform(0.8, 1.2)
    cw, ch = w2 * zoom, h2 * zoom
    x = rng.uniform(0, scene.width - cw)
    y = rng.uniform(0, scene.height - ch)
    canvas = scene.resize((w2, h2), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    d = ImageDraw.Draw(canvas, "RGBA")

    ident, view, kind = task["identity"], task["view"], task["kind"]
    u = h2 * style["scale"] * ident["height"] * rng.uniform(0.94, 1.06)
    cx = w2 / 2 + rng.uniform(-0.1, 0.1) * w2
    y0 = (h2 - u) / 2 + rng.uniform(-0.05, 0.05) * h2
    swing = rng.uniform(-1.0, 1.0)
    if kind == "person":
        _draw_person(d, ident, view, cx, y0, u, swing)
    elif kind == "part":  # badly cropped box: a zoomed-in part of a person
        uu = u * rng.uniform(1.8, 2.6)
        _draw_person(d, ident, view, cx + rng.uniform(-0.3, 0.3) * w2,
                     -rng.uniform(0.1, 0.6) * uu, uu, swing)

    occ = task["occlusion"]
    if occ == "pillar":
        pw = rng.uniform(0.2, 0.4) * w2
        x0 = 0.0 if rng.random() < 0.5 else w2 - pw
        base = np.array(style["props"][rng.integers(len(style["props"]))], dtype=float)
        for k in range(int(pw)):
            shade = 0.75 + 0.35 * math.sin(math.pi * k / max(1.0, pw))
            d.line([(x0 + k, 0), (x0 + k, h2)],
                   fill=tuple(int(v) for v in np.clip(base * shade, 0, 255)))
    elif occ == "object":
        oh = rng.uniform(0.25, 0.45) * h2
        ow = rng.uniform(0.6, 1.0) * w2
        ox = rng.uniform(-0.2, 0.2) * w2 + (w2 - ow) / 2
        col = tuple(int(v) for v in style["props"][rng.integers(len(style["props"]))])
        d.rectangle([ox, h2 - oh, ox + ow, h2 + 2], fill=col)
        for k in range(1, 4):
            yy = h2 - oh + k * oh / 4
            d.line([(ox, yy), (ox + ow, yy)], fill=tuple(int(v * 0.7) for v in col), width=2)
    elif occ == "person":
        other = task["other"]
        uo = u * rng.uniform(1.0, 1.15)
        side = -1.0 if rng.random() < 0.5 else 1.0
        _draw_person(d, other, "front" if rng.random() < 0.5 else "back",
                     w2 / 2 + side * rng.uniform(0.45, 0.65) * w2, y0 + rng.uniform(0.0, 0.06) * h2,
                     uo, rng.uniform(-1, 1))

    img = canvas.reduce(2)
    a = np.asarray(img, dtype=np.float32)
    a = a * np.asarray(style["gain"], dtype=np.float32)
    grey = a.mean(axis=2, keepdims=True)
    a = grey + (a - grey) * style["saturation"]
    a = (a - 128.0) * style["contrast"] + 128.0
    light = style["brightness"] * rng.uniform(0.9, 1.1)
    ramp = 1.0 + style["gradient"] * (0.5 - np.arange(h, dtype=np.float32) / h)
    a = a * (light * ramp)[:, None, None]
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if style["blur"] > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(style["blur"]))
    a = np.asarray(img, dtype=np.float32)
    a = a + rng.normal(0.0, style["noise"], a.shape).astype(np.float32)
    img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    img.save(task["path"], "JPEG", quality=int(style["quality"]))


def _render_many(tasks: List[Dict[str, Any]]) -> int:
    for t in tasks:
        _render(t)
    return len(tasks)


def render_tasks(tasks: List[Dict[str, Any]], workers: Optional[int], progress: bool) -> None:
    """Render every task, in chunks of 32, in this process or a pool of ``workers`` (default: up to 4)."""
    from tqdm import tqdm

    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    bar = tqdm(total=len(tasks), desc="synthetic camera network", unit="img",
               disable=not progress, leave=False)
    chunk = 32
    chunks = [tasks[i:i + chunk] for i in range(0, len(tasks), chunk)]
    try:
        if workers <= 1 or len(chunks) < 2:
            for c in chunks:
                bar.update(_render_many(c))
        else:
            import multiprocessing as mp

            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            with ctx.Pool(workers) as pool:
                for n in pool.imap_unordered(_render_many, chunks):
                    bar.update(n)
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Contact sheet
# ----------------------------------------------------------------------------------------------

def contact_sheet(records: Sequence[Record], path: str, n: int = 32, columns: int = 8,
                  cell: Tuple[int, int] = (64, 128), labels: bool = True) -> str:
    """Save a grid of the first ``n`` records' images (with ``pid``/camera/time labels) as a picture."""
    from PIL import Image, ImageDraw

    recs = list(records)[:n]
    if not recs:
        raise ValueError("contact_sheet needs at least one record")
    cw, ch = cell
    lab = 22 if labels else 0
    rows = math.ceil(len(recs) / columns)
    sheet = Image.new("RGB", (columns * (cw + 2) + 2, rows * (ch + lab + 2) + 2), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, r in enumerate(recs):
        x = 2 + (i % columns) * (cw + 2)
        y = 2 + (i // columns) * (ch + lab + 2)
        sheet.paste(read_image(r.path).resize((cw, ch), Image.BILINEAR), (x, y))
        if labels:
            d.text((x + 1, y + ch), f"id {r.pid} c{r.camid + 1}", fill=(0, 0, 0))
            if r.time is not None:
                d.text((x + 1, y + ch + 10), f"{r.time:.1f}s", fill=(90, 90, 90))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path
