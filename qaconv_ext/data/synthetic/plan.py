"""The plan of the synthetic camera network: everything but the pixels.

Identities (appearance vocabulary, families sharing a colour triple), the camera graph and each
camera's style, groups and their walks through the cameras, the query/gallery/train splits,
distractors and junk, occlusions, per-box render seeds, recording sessions and Market-1501 file
names. All random draws of the generator happen here, in a fixed order per domain.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

GENERATOR_VERSION = 2
FPS = 25.0
DOMAINS = ("domain_a", "domain_b")
SUBDIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

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
        im["file"] = f"{SUBDIRS[im['split']]}/{name}"
        if "identity" not in im:
            im["identity"] = by_pid[im["pid"]]
    return dict(domain=domain, cameras=styles, edges=edges, groups=group_info, images=images,
                fps=FPS)


def plan_synthetic_network(seed: int = 0, **params: Any) -> Dict[str, Dict[str, Any]]:
    """The full plan of both domains (identities, schedule, file names) without writing pixels.

    Keyword arguments override :data:`SYNTHETIC_DEFAULTS`. Used by
    :func:`make_synthetic_network`; handy for inspecting the ground truth.
    """
    p = resolve_params(params)
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


def resolve_params(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """:data:`SYNTHETIC_DEFAULTS` updated with ``overrides``, checked and converted to int/float/tuples."""
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
