"""The built-in synthetic camera network: two small re-id domains written as Market-1501 folders.

``make_synthetic_network(root)`` draws stylised pedestrians walking in groups through a network of
six cameras and writes, for two domains ``domain_a`` and ``domain_b``, real JPEG files in the
Market-1501 layout (``bounding_box_train``, ``query``, ``bounding_box_test``; names
``PPPP_cCsS_FFFFFF_NN.jpg``) so that :class:`~qaconv_ext.data.Market1501` reads them, time stamps
included.

What the images contain:

* **Identities** built from local parts: hair (style, colour), upper garment (colour, pattern:
  plain, stripes, two-tone split, chest band; sleeves), a small logo (shape, colour, position,
  front/back), lower garment (trousers, shorts, skirt; side stripe), shoes, bag (backpack,
  shoulder bag, handbag), height and build. Identities come in *families* of two or three that
  use the same three colours on different parts (red top/blue trousers vs blue top/red trousers),
  so the overall colour histogram is shared and only the spatial arrangement and the small local
  marks tell family members apart.
* **Pose and framing**: walking phase (legs, arms), front or back view per camera pass, random
  scale and horizontal/vertical offsets of the person in the box.
* **Occlusions**: pillars, objects covering the lower body, other pedestrians in front.
* **Cameras**: each camera has its own background scene, colour cast, brightness, contrast,
  saturation, blur, noise and JPEG quality. Both domains film the same kind of indoor site (each
  camera its own layout of walls, doors, signs and floor); domain A's cameras are bright, warm and
  clean, domain B's cooler, dimmer, blurrier, noisier and more compressed.
* **Time**: the six cameras form a graph (a ring plus two chords) with a transit time per edge.
  Groups of two to four people start at random times, pass through a random path of two to four
  cameras, stay a few seconds in view of each camera and reach the next one after the edge's
  transit time (scaled by the group's walking speed). Members of a group are seen in the same
  camera within seconds of each other. Frames are counted at 25 fps; each camera's recording is
  split into ``sessions_per_camera`` sessions whose frame counter restarts, and the session
  boundaries are placed so that Market-1501's cumulative-session rule recovers the exact times.

Splits per domain: ``num_train_ids`` training identities (all their images in
``bounding_box_train``); ``num_test_ids`` test identities whose groups get one or two query
cameras (one image per member per query camera in ``query``, the rest in ``bounding_box_test``,
always with a match in another camera); ``num_distractors`` gallery images of one-off people
(pid 0) and ``num_junk`` junk images (pid -1: background or badly cropped boxes). The two domains
have disjoint identities (domain A numbers 1-1499, domain B 1501-2999).

Caching: ``root/manifest.json`` records the generator version and every parameter. When it
matches and the image counts agree, nothing is regenerated. New data are written into a temporary
folder under ``root`` and moved into place, and the manifest is written last, so an interrupted
run never leaves a set that passes as complete.

Each domain folder also holds ``annotations.json``: the camera graph, the camera styles, the
groups (identities, path, entry times) and, per image, its identity, camera, time, group, view
and occlusion.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .records import Record, read_image

__all__ = [
    "GENERATOR_VERSION",
    "SYNTHETIC_DEFAULTS",
    "make_synthetic_network",
    "plan_synthetic_network",
    "load_annotations",
    "contact_sheet",
]

GENERATOR_VERSION = 2
FPS = 25.0
DOMAINS = ("domain_a", "domain_b")
_SUBDIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

#: Default parameters of :func:`make_synthetic_network` (per domain unless stated).
SYNTHETIC_DEFAULTS: Dict[str, Any] = dict(
    num_train_ids=120,        # training identities
    num_test_ids=100,         # query/gallery identities
    num_distractors=100,      # gallery images of one-off people, pid 0
    num_junk=20,              # gallery junk images, pid -1 (dropped by the parser)
    num_cameras=6,
    sessions_per_camera=2,    # recording sessions per camera (frame counter restarts)
    group_size=(2, 4),        # people walking together
    path_length=(2, 4),       # cameras visited per group
    images_per_visit=(2, 6),  # boxes per person per camera pass
    group_interval=80.0,      # mean seconds between group starts (sets the timeline length)
    occlusion_prob=0.25,      # chance that a box is occluded
    height=128,
    width=64,
)

# ----------------------------------------------------------------------------------------------
# Appearance vocabulary
# ----------------------------------------------------------------------------------------------

PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (190, 35, 40), "blue": (35, 70, 180), "green": (40, 140, 60),
    "yellow": (225, 195, 45), "white": (232, 232, 226), "black": (32, 32, 35),
    "grey": (125, 125, 128), "purple": (115, 55, 150), "orange": (230, 120, 35),
    "sky": (120, 175, 225), "brown": (115, 75, 45), "pink": (225, 130, 165),
    "teal": (30, 140, 140), "navy": (30, 40, 95),
}
_COLOR_NAMES = tuple(PALETTE)
SKIN = ((241, 200, 170), (224, 172, 135), (198, 140, 100), (150, 100, 70), (105, 70, 50))
HAIR = ((25, 20, 18), (70, 45, 30), (120, 80, 45), (205, 170, 100), (150, 150, 150))
HAIR_STYLES = ("short", "long", "cap")
UPPER_PATTERNS = ("plain", "stripes", "split", "band")
LOGO_SHAPES = ("none", "circle", "square", "triangle", "cross", "diamond")
LOGO_POS = ("centre", "left", "right", "low")
LOGO_SIDES = ("front", "back", "both")
LOWER_TYPES = ("trousers", "trousers", "shorts", "skirt")
SHOES = ((30, 30, 30), (235, 235, 235), (110, 70, 40), (180, 30, 30), (40, 60, 150))
BAGS = ("none", "none", "backpack", "shoulder_left", "shoulder_right", "handbag")
OCCLUSIONS = ("pillar", "object", "person")

# The site both domains film: an indoor hall's wall, floor and prop colours (each camera draws its own).
_SITE = dict(
    walls=((200, 190, 170), (182, 180, 186), (212, 200, 182), (172, 160, 148), (215, 212, 200)),
    floors=((150, 140, 130), (122, 112, 102), (192, 186, 178), (165, 150, 120)),
    props=((90, 110, 140), (160, 60, 50), (60, 120, 90), (220, 220, 215), (120, 90, 60), (200, 170, 80)),
)

# Per-domain camera style ranges: (low, high) uniform draws per camera.
DOMAIN_STYLES: Dict[str, Dict[str, Any]] = {
    "domain_a": dict(  # bright, warm, clean cameras
        gain_r=(0.98, 1.10), gain_g=(0.95, 1.05), gain_b=(0.84, 0.97),
        brightness=(0.92, 1.15), contrast=(0.88, 1.10), saturation=(0.85, 1.10),
        gradient=(-0.10, 0.15), blur=(0.0, 0.5), noise=(1.5, 4.0), quality=(88, 95),
        scale=(0.82, 0.94), **_SITE,
    ),
    "domain_b": dict(  # the same kind of site seen by other cameras: cooler, dimmer, blurrier, noisier
        gain_r=(0.84, 0.95), gain_g=(0.96, 1.06), gain_b=(1.00, 1.12),
        brightness=(0.85, 1.00), contrast=(0.82, 0.96), saturation=(0.78, 0.95),
        gradient=(0.05, 0.25), blur=(0.1, 0.6), noise=(2.0, 4.5), quality=(82, 92),
        scale=(0.76, 0.92), **_SITE,
    ),
}


# ----------------------------------------------------------------------------------------------
# Planning: identities, camera network, groups, schedule, splits, file names
# ----------------------------------------------------------------------------------------------

def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: int = 14) -> List[int]:
    return [int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb]


def _sample_identity(rng: np.random.Generator, colors: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """One person's appearance; ``colors`` = (upper, lower, accent) names, else random."""
    if colors is None:
        colors = list(rng.choice(_COLOR_NAMES, size=3, replace=False))
    upper, lower, accent = colors
    pattern = str(rng.choice(UPPER_PATTERNS, p=[0.4, 0.2, 0.2, 0.2]))
    logo = str(rng.choice(LOGO_SHAPES, p=[0.2, 0.16, 0.16, 0.16, 0.16, 0.16]))
    bag = str(rng.choice(BAGS))
    # The accent colour goes to the logo, the pattern or the bag, whichever the person has.
    second = str(rng.choice([c for c in _COLOR_NAMES if c not in (upper, lower, accent)]))
    p_color = accent if pattern != "plain" else second
    logo_color = accent if (logo != "none" and pattern == "plain") else second
    bag_color = accent if (bag != "none" and pattern == "plain" and logo == "none") else second
    return {
        "skin": _jitter(rng, SKIN[rng.integers(len(SKIN))], 8),
        "hair": _jitter(rng, HAIR[rng.integers(len(HAIR))], 8),
        "hair_style": str(rng.choice(HAIR_STYLES, p=[0.5, 0.3, 0.2])),
        "cap": _jitter(rng, PALETTE[str(rng.choice(_COLOR_NAMES))]),
        "height": float(rng.uniform(0.88, 1.0)),
        "build": float(rng.uniform(0.85, 1.2)),
        "upper": _jitter(rng, PALETTE[upper]),
        "upper_name": upper,
        "pattern": pattern,
        "pattern_color": _jitter(rng, PALETTE[p_color]),
        "stripes": int(rng.integers(2, 5)),
        "sleeves": str(rng.choice(("short", "long"))),
        "logo": logo,
        "logo_color": _jitter(rng, PALETTE[logo_color]),
        "logo_pos": str(rng.choice(LOGO_POS)),
        "logo_side": str(rng.choice(LOGO_SIDES)),
        "lower": _jitter(rng, PALETTE[lower]),
        "lower_name": lower,
        "lower_type": str(rng.choice(LOWER_TYPES)),
        "side_stripe": bool(rng.random() < 0.25),
        "stripe_color": _jitter(rng, PALETTE[second]),
        "shoes": _jitter(rng, SHOES[rng.integers(len(SHOES))], 10),
        "bag": bag,
        "bag_color": _jitter(rng, PALETTE[bag_color]),
    }


def _signature(ident: Dict[str, Any]) -> Tuple:
    keys = ("upper_name", "lower_name", "pattern", "logo", "logo_pos", "lower_type", "bag",
            "hair_style", "sleeves")
    return tuple(ident[k] for k in keys)


def _sample_population(rng: np.random.Generator, n: int, taken: set) -> List[Dict[str, Any]]:
    """``n`` identities with unique signatures, in families sharing one colour triple."""
    out: List[Dict[str, Any]] = []
    perms = [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0), (2, 0, 1)]
    while len(out) < n:
        triple = list(rng.choice(_COLOR_NAMES, size=3, replace=False))
        size = int(rng.integers(2, 4))
        order = rng.permutation(len(perms))[:size]
        for k in order:
            if len(out) == n:
                break
            colors = [triple[i] for i in perms[k]]
            for _ in range(20):
                ident = _sample_identity(rng, colors)
                if _signature(ident) not in taken:
                    taken.add(_signature(ident))
                    out.append(ident)
                    break
    return out


def _camera_graph(rng: np.random.Generator, num_cameras: int) -> List[Tuple[int, int, float]]:
    """A ring of cameras plus two random chords; transit seconds per edge."""
    edges = {(i, (i + 1) % num_cameras) for i in range(num_cameras)} if num_cameras > 2 else {(0, 1)}
    edges = {tuple(sorted(e)) for e in edges}
    for _ in range(2 if num_cameras >= 5 else 0):
        for _ in range(20):
            a, b = sorted(int(x) for x in rng.choice(num_cameras, 2, replace=False))
            if (a, b) not in edges:
                edges.add((a, b))
                break
    return [(a, b, float(round(rng.uniform(25.0, 90.0), 1))) for a, b in sorted(edges)]


def _camera_style(rng: np.random.Generator, domain: str) -> Dict[str, Any]:
    spec = DOMAIN_STYLES[domain]
    u = lambda key: float(rng.uniform(*spec[key]))  # noqa: E731
    return {
        "gain": [u("gain_r"), u("gain_g"), u("gain_b")],
        "brightness": u("brightness"), "contrast": u("contrast"), "saturation": u("saturation"),
        "gradient": u("gradient"), "blur": u("blur"), "noise": u("noise"),
        "quality": int(rng.integers(spec["quality"][0], spec["quality"][1] + 1)),
        "scale": u("scale"), "bg_seed": int(rng.integers(2 ** 31)),
        "wall": list(spec["walls"][rng.integers(len(spec["walls"]))]),
        "floor": list(spec["floors"][rng.integers(len(spec["floors"]))]),
        "props": [list(p) for p in spec["props"]],
        "dwell": float(rng.uniform(4.0, 9.0)),
    }


def _random_path(rng: np.random.Generator, adj: Dict[int, List[int]], length: int,
                 num_cameras: int) -> List[int]:
    path = [int(rng.integers(num_cameras))]
    while len(path) < length:
        options = [c for c in adj[path[-1]] if c not in path]
        if not options:
            break
        path.append(int(rng.choice(options)))
    return path


def _split_groups(rng: np.random.Generator, ids: List[int], lo: int, hi: int) -> List[List[int]]:
    ids = [ids[i] for i in rng.permutation(len(ids))]
    groups: List[List[int]] = []
    i = 0
    while i < len(ids):
        size = int(rng.integers(lo, hi + 1))
        groups.append(ids[i:i + size])
        i += size
    if len(groups) > 1 and len(groups[-1]) < lo:
        groups[-2].extend(groups.pop())
    return groups


def _plan_domain(domain: str, index: int, seed: int, p: Dict[str, Any],
                 identities: List[Dict[str, Any]], pids: List[int], taken: set) -> Dict[str, Any]:
    """Everything about one domain except the pixels."""
    ss = np.random.SeedSequence([seed, 7919, index])
    r_net, r_time, r_img, r_extra = (np.random.default_rng(s) for s in ss.spawn(4))
    ncam = p["num_cameras"]
    edges = _camera_graph(r_net, ncam)
    adj: Dict[int, List[int]] = {c: [] for c in range(ncam)}
    transit: Dict[Tuple[int, int], float] = {}
    for a, b, t in edges:
        adj[a].append(b)
        adj[b].append(a)
        transit[(a, b)] = transit[(b, a)] = t
    styles = [_camera_style(r_net, domain) for _ in range(ncam)]

    n_train = p["num_train_ids"]
    by_pid = dict(zip(pids, identities))
    train_pids, test_pids = pids[:n_train], pids[n_train:]
    glo, ghi = p["group_size"]
    groups = ([("train", g) for g in _split_groups(r_time, train_pids, glo, ghi)]
              + [("test", g) for g in _split_groups(r_time, test_pids, glo, ghi)])
    order = r_time.permutation(len(groups))
    groups = [groups[i] for i in order]
    horizon = len(groups) * float(p["group_interval"])
    starts = np.sort(r_time.uniform(10.0, 10.0 + horizon, len(groups)))

    images: List[Dict[str, Any]] = []   # planned boxes
    group_info: List[Dict[str, Any]] = []
    plo, phi = p["path_length"]
    ilo, ihi = p["images_per_visit"]
    for gid, ((split, members), t0) in enumerate(zip(groups, starts)):
        path = _random_path(r_time, adj, int(r_time.integers(plo, phi + 1)), ncam)
        speed = float(r_time.uniform(0.85, 1.2))
        offsets = {pid: float(r_time.uniform(0.0, 3.0)) for pid in members}
        t = float(t0)
        enters = []
        for step, cam in enumerate(path):
            if step:
                t += transit[(path[step - 1], cam)] * speed * float(r_time.uniform(0.92, 1.08))
            enters.append(round(t, 3))
            dwell = styles[cam]["dwell"] * float(r_time.uniform(0.8, 1.25))
            view = "front" if r_time.random() < 0.5 else "back"
            for pid in members:
                k = int(r_time.integers(ilo, ihi + 1))
                a = t + offsets[pid]
                frames = np.unique(np.round(r_time.uniform(a, a + dwell, k) * FPS).astype(np.int64))
                for f in frames:
                    images.append(dict(pid=pid, cam=cam, frame=int(f), group=gid, view=view,
                                       split=split, kind="person"))
            t += dwell
        group_info.append(dict(id=gid, split=split, pids=list(members), path=path,
                               enter_times=enters))
    t_end = max(im["frame"] for im in images) / FPS if images else horizon

    # Query selection: per test group one or two of its cameras, one box per member per camera.
    boxes: Dict[Tuple[int, int, int], List[Dict[str, Any]]] = {}
    for im in images:
        boxes.setdefault((im["pid"], im["cam"], im["group"]), []).append(im)
    for g in group_info:
        if g["split"] != "test":
            continue
        cams = list(dict.fromkeys(g["path"]))
        nq = 1 if len(cams) <= 2 else int(r_time.integers(1, 3))
        qcams = set(int(c) for c in r_time.choice(cams, size=min(nq, len(cams) - 1), replace=False))
        g["query_cameras"] = sorted(qcams)
        for pid in g["pids"]:
            for cam in sorted(qcams):
                cand = boxes[(pid, cam, g["id"])]
                cand[int(r_time.integers(len(cand)))]["split"] = "query"
    for im in images:
        if im["split"] == "test":
            im["split"] = "gallery"

    # Distractors (pid 0) and junk (pid -1), gallery only; people unlike any identity.
    for _ in range(p["num_distractors"]):
        images.append(dict(pid=0, cam=int(r_extra.integers(ncam)),
                           frame=int(round(r_extra.uniform(10.0, t_end) * FPS)), group=-1,
                           view="front" if r_extra.random() < 0.5 else "back", split="gallery",
                           kind="person", identity=_sample_population(r_extra, 1, taken)[0]))
    for _ in range(p["num_junk"]):
        images.append(dict(pid=-1, cam=int(r_extra.integers(ncam)),
                           frame=int(round(r_extra.uniform(10.0, t_end) * FPS)), group=-1,
                           view="front" if r_extra.random() < 0.5 else "back", split="gallery",
                           kind=str(r_extra.choice(("background", "part"))),
                           identity=_sample_population(r_extra, 1, taken)[0]))

    # Occlusions (with the occluding passer-by, if any) and per-image render seeds.
    for im in images:
        occluded = im["kind"] == "person" and r_img.random() < p["occlusion_prob"]
        im["occlusion"] = str(r_img.choice(OCCLUSIONS, p=[0.4, 0.35, 0.25])) if occluded else None
        if im["occlusion"] == "person":
            im["other"] = _sample_identity(r_img)
        im["seed"] = int(r_img.integers(2 ** 62))

    # Sessions: split each camera's timeline at frames of kept (pid != -1) boxes, so that the
    # session's largest frame is exactly the next session's start.
    sessions = p["sessions_per_camera"]
    for cam in range(ncam):
        kept = sorted(im["frame"] for im in images if im["cam"] == cam and im["pid"] != -1)
        bounds: List[int] = []
        for k in range(1, sessions):
            if kept:
                b = kept[min(len(kept) - 1, (len(kept) * k) // sessions)]
                if not bounds or b > bounds[-1]:
                    bounds.append(b)
        for im in images:
            if im["cam"] != cam:
                continue
            s = sum(1 for b in bounds if im["frame"] > b)
            start = bounds[s - 1] if s else 0
            im["session"] = s + 1
            im["session_frame"] = im["frame"] - start
            if im["session_frame"] >= 10 ** 6:
                raise ValueError("timeline too long for 6-digit frame numbers: lower group_interval "
                                 "or raise sessions_per_camera")

    # Box index within a frame and file names.
    images.sort(key=lambda im: (im["cam"], im["frame"], im["pid"], im["split"]))
    per_frame: Dict[Tuple[int, int], int] = {}
    for im in images:
        key = (im["cam"], im["frame"])
        per_frame[key] = per_frame.get(key, 0) + 1
        pid_txt = "-1" if im["pid"] == -1 else f"{im['pid']:04d}"
        name = (f"{pid_txt}_c{im['cam'] + 1}s{im['session']}_{im['session_frame']:06d}_"
                f"{per_frame[key]:02d}.jpg")
        im["file"] = f"{_SUBDIRS[im['split']]}/{name}"
        if "identity" not in im:
            im["identity"] = by_pid[im["pid"]]
    return dict(domain=domain, cameras=styles, edges=edges, groups=group_info, images=images,
                fps=FPS)


def plan_synthetic_network(seed: int = 0, **params: Any) -> Dict[str, Dict[str, Any]]:
    """The full plan of both domains (identities, schedule, file names) without writing pixels.

    Keyword arguments override :data:`SYNTHETIC_DEFAULTS`. Used by
    :func:`make_synthetic_network`; handy for inspecting the ground truth.
    """
    p = _params(params)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 104729]))
    n = p["num_train_ids"] + p["num_test_ids"]
    if n > 1499:
        raise ValueError("at most 1499 identities per domain")
    taken: set = set()
    plans = {}
    for index, domain in enumerate(DOMAINS):
        identities = _sample_population(rng, n, taken)
        pids = sorted(int(x) + 1 + 1500 * index for x in rng.choice(1499, n, replace=False))
        pids = [pids[i] for i in rng.permutation(n)]  # random train/test assignment
        plans[domain] = _plan_domain(domain, index, seed, p, identities, pids, taken)
    return plans


def _params(overrides: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(overrides) - set(SYNTHETIC_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic-network parameters: {sorted(unknown)}")
    p = dict(SYNTHETIC_DEFAULTS)
    p.update(overrides)
    for key in ("group_size", "path_length", "images_per_visit"):
        lo, hi = (int(v) for v in p[key])
        if not 1 <= lo <= hi:
            raise ValueError(f"{key} must be (low, high) with 1 <= low <= high, got {p[key]}")
        p[key] = (lo, hi)
    if p["path_length"][0] < 2:
        raise ValueError("path_length must start at 2: every test identity needs two cameras")
    if p["num_cameras"] < 2 or p["sessions_per_camera"] < 1:
        raise ValueError("need at least 2 cameras and 1 session per camera")
    if p["num_train_ids"] < 1 or p["num_test_ids"] < 1:
        raise ValueError("need at least one training and one test identity")
    for key in ("num_train_ids", "num_test_ids", "num_distractors", "num_junk", "num_cameras",
                "sessions_per_camera", "height", "width"):
        p[key] = int(p[key])
    p["group_interval"] = float(p["group_interval"])
    p["occlusion_prob"] = float(p["occlusion_prob"])
    return p


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Writing, caching
# ----------------------------------------------------------------------------------------------

def _tasks_for(plan: Dict[str, Any], out_dir: str, p: Dict[str, Any]) -> List[Dict[str, Any]]:
    tasks = []
    for im in plan["images"]:
        tasks.append(dict(path=os.path.join(out_dir, im["file"]), seed=im["seed"],
                          identity=im["identity"], other=im.get("other"), view=im["view"],
                          kind=im["kind"], occlusion=im["occlusion"],
                          style=plan["cameras"][im["cam"]], width=p["width"], height=p["height"]))
    return tasks


def _annotations(plan: Dict[str, Any], p: Dict[str, Any], seed: int) -> Dict[str, Any]:
    cols = ["file", "pid", "camid", "time", "group", "view", "occlusion", "split"]
    rows = [[im["file"], im["pid"], im["cam"], im["frame"] / FPS, im["group"], im["view"],
             im["occlusion"], im["split"]] for im in plan["images"]]
    cams = [{k: v for k, v in s.items() if k not in ("props",)} for s in plan["cameras"]]
    return {
        "generator_version": GENERATOR_VERSION, "seed": seed, "domain": plan["domain"],
        "fps": FPS, "params": _jsonable(p), "cameras": cams,
        "edges": [list(e) for e in plan["edges"]], "groups": plan["groups"],
        "images": {"columns": cols, "rows": rows},
    }


def _jsonable(p: Dict[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}


def load_annotations(domain_path: str) -> Dict[str, Any]:
    """The ``annotations.json`` of a generated domain; ``images`` as a list of dicts."""
    with open(os.path.join(domain_path, "annotations.json"), "r", encoding="utf-8") as fh:
        ann = json.load(fh)
    cols = ann["images"]["columns"]
    ann["images"] = [dict(zip(cols, row)) for row in ann["images"]["rows"]]
    return ann


def _count_images(folder: str) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.name.endswith(".jpg"))
    except FileNotFoundError:
        return -1


def _manifest_ok(root: str, manifest: Dict[str, Any]) -> bool:
    path = os.path.join(root, "manifest.json")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return False
    if old.get("version") != manifest["version"] or old.get("params") != manifest["params"]:
        return False
    for domain, counts in old.get("counts", {}).items():
        for split, n in counts.items():
            if _count_images(os.path.join(root, domain, _SUBDIRS[split])) != n:
                return False
    return set(old.get("counts", {})) == set(DOMAINS)


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no advisory locks on this platform
        yield
        return
    with open(os.path.join(root, ".synthetic.lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def make_synthetic_network(root: str, seed: int = 0, *, workers: Optional[int] = None,
                           progress: bool = True, force: bool = False,
                           **params: Any) -> Dict[str, str]:
    """Generate (or re-use) the synthetic camera network under ``root``.

    Returns ``{"domain_a": path, "domain_b": path}``; load either with ``Market1501(path)``.
    Keyword parameters (defaults in :data:`SYNTHETIC_DEFAULTS`, all per domain):
    ``num_train_ids=120``, ``num_test_ids=100``, ``num_distractors=100``, ``num_junk=20``,
    ``num_cameras=6``, ``sessions_per_camera=2``, ``group_size=(2, 4)``, ``path_length=(2, 4)``,
    ``images_per_visit=(2, 6)``, ``group_interval=80.0`` (seconds), ``occlusion_prob=0.25``,
    ``height=128``, ``width=64``.
    The same ``seed`` and parameters give byte-identical files whatever ``workers`` is.
    ``workers``: rendering processes (default: up to 4, by CPU count; 0 renders in this process).
    ``force``: regenerate even when a matching set exists.
    """
    p = _params(params)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    os.makedirs(root, exist_ok=True)
    out = {d: os.path.join(root, d) for d in DOMAINS}
    manifest: Dict[str, Any] = {"generator": "qaconv_ext synthetic camera network",
                                "version": GENERATOR_VERSION,
                                "params": dict(_jsonable(p), seed=int(seed))}
    with _locked(root):
        if not force and _manifest_ok(root, manifest):
            return out
        for name in os.listdir(root):  # leftovers of interrupted runs (we hold the lock)
            if name.startswith(".synthetic-tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        for d in DOMAINS:
            target = out[d]
            if os.path.exists(target) and not os.path.isfile(os.path.join(target, "annotations.json")):
                raise FileExistsError(f"{target} exists and was not written by the synthetic "
                                      "generator; refusing to overwrite it")
        t_start = time.time()
        plans = plan_synthetic_network(seed, **p)
        tmp = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=root)
        try:
            tasks: List[Dict[str, Any]] = []
            counts: Dict[str, Dict[str, int]] = {}
            for d in DOMAINS:
                base = os.path.join(tmp, d)
                for sub in _SUBDIRS.values():
                    os.makedirs(os.path.join(base, sub))
                tasks += _tasks_for(plans[d], base, p)
                counts[d] = {s: sum(1 for im in plans[d]["images"] if im["split"] == s)
                             for s in _SUBDIRS}
                _write_json_atomic(os.path.join(base, "annotations.json"),
                                   _annotations(plans[d], p, seed))
            _run_tasks(tasks, workers, progress)
            # Swap in: invalidate the old manifest first, write the new one last.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(root, "manifest.json"))
            for d in DOMAINS:
                if os.path.exists(out[d]):
                    trash = tempfile.mkdtemp(prefix=".synthetic-tmp-old-", dir=root)
                    os.rename(out[d], os.path.join(trash, d))
                    shutil.rmtree(trash, ignore_errors=True)
                os.rename(os.path.join(tmp, d), out[d])
            manifest["counts"] = counts
            manifest["seconds"] = round(time.time() - t_start, 2)
            _write_json_atomic(os.path.join(root, "manifest.json"), manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run_tasks(tasks: List[Dict[str, Any]], workers: Optional[int], progress: bool) -> None:
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
