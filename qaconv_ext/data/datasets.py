"""Person re-id datasets: Market-1501, DukeMTMC-reID, MSMT17 and a generic folder layout.

Every dataset exposes ``train``, ``query`` and ``gallery`` (lists of :class:`Record`),
``num_train_pids``, ``num_train_cams`` and ``summary()``. Junk images (pid -1) are dropped,
distractors (pid 0) stay in the gallery, training identities are relabelled ``0..C-1`` in
ascending order of their original number (``train_pid_map`` keeps the mapping).

Time stamps (seconds):

* Market-1501, names ``PPPP_cCsS_FFFFFF_NN.jpg``: each camera recorded several sessions whose frame
  counters restart at zero; session ``s`` of a camera is shifted by an offset ``O[s]`` (``O[1] = 0``)
  and seconds = shifted frame / 25. ``M[s]`` is the largest frame number of session ``s`` of that
  camera over train, query and gallery (junk excluded; 0 for a session without images).
  ``session_offsets="public"`` (the default) computes the offsets as the paper's public code does:
  ``O[s] = M[s-1] + 2 O[s-1]`` when session ``s-1`` has images, else ``O[s-1]`` (it takes the maximum
  of session ``s-1`` after that session was shifted, then adds ``O[s-1]`` once more): sessions 1 and
  2 abut, later ones start ``O[s-1]`` frames after the previous one ended; the paper's TLift results
  use these times. ``"cumulative"`` uses
  ``O[s] = M[s-1] + O[s-1]``: the sessions of a camera abut, as if recorded back to back. The two
  agree for cameras with at most two sessions.
* DukeMTMC-reID, names ``PPPP_cC_fFFFFFFF.jpg``: seconds = (frame + offset[C]) / 59.94 with the
  per-camera offsets :data:`DUKE_FRAME_OFFSETS` that align the eight cameras.
* MSMT17 has no usable time stamps (``time`` is ``None``).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .records import Record

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetFormatError",
    "ReIDDataset",
    "Market1501",
    "DukeMTMCreID",
    "MSMT17",
    "ImageFolderDataset",
    "parse_market_name",
    "parse_duke_name",
    "parse_msmt_camera",
    "market_cumulative_frames",
    "market_session_frames",
    "MARKET_SESSION_OFFSETS",
    "DUKE_FRAME_OFFSETS",
    "DUKE_FPS",
    "MARKET_FPS",
    "DATASETS",
    "build_dataset",
]

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MARKET_FPS = 25.0
#: How Market-1501 sessions are placed on one clock per camera (see the module doc).
MARKET_SESSION_OFFSETS = ("public", "cumulative")
DUKE_FPS = 59.94
# Frame offsets that align the eight DukeMTMC cameras (camera 1..8) on one clock.
DUKE_FRAME_OFFSETS = (5542, 3606, 27243, 31181, 0, 22401, 18967, 46765)

_MARKET_RE = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)$")
_DUKE_RE = re.compile(r"^(-?\d+)_c(\d+)_f(\d+)$")


class DatasetFormatError(ValueError):
    """A file name, list line or folder that does not follow the dataset's layout."""


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder: str, recursive: bool = False) -> List[str]:
    """Sorted image files in ``folder`` (non-image files such as ``Thumbs.db`` are skipped)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    out: List[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            out.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    else:
        with os.scandir(folder) as it:
            out.extend(e.path for e in it if e.is_file() and _is_image(e.name))
    out.sort()
    return out


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _resolve_root(root: PathLike, folder_names: Sequence[str],
                  is_dataset_dir: Callable[[str], bool], dataset: str) -> str:
    """``root`` itself when it is the dataset folder, else the first ``root/<name>`` that is."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset}: root folder not found: {root}")
    tried = [root]
    if is_dataset_dir(root):
        return root
    for name in folder_names:
        cand = os.path.join(root, name)
        tried.append(cand)
        if is_dataset_dir(cand):
            return cand
    raise FileNotFoundError(f"{dataset}: no dataset folder found; looked at: " + ", ".join(tried))


def _has_dirs(*names: str) -> Callable[[str], bool]:
    return lambda d: all(os.path.isdir(os.path.join(d, n)) for n in names)


def parse_market_name(path: str) -> Tuple[int, int, int, int, int]:
    """``PPPP_cCsS_FFFFFF_NN.jpg`` -> ``(pid, camera, session, frame, box)`` (camera, session 1-based)."""
    m = _MARKET_RE.match(_stem(path))
    if m is None:
        raise DatasetFormatError(
            f"file name does not follow the Market-1501 naming PPPP_cCsS_FFFFFF_NN.jpg: {path}")
    pid, cam, session, frame, box = (int(g) for g in m.groups())
    if cam < 1 or session < 1:
        raise DatasetFormatError(f"camera and session numbers start at 1 in Market-1501 names: {path}")
    return pid, cam, session, frame, box


def parse_duke_name(path: str) -> Tuple[int, int, int]:
    """``PPPP_cC_fFFFFFFF.jpg`` -> ``(pid, camera, frame)`` (camera 1-based)."""
    m = _DUKE_RE.match(_stem(path))
    if m is None:
        raise DatasetFormatError(
            f"file name does not follow the DukeMTMC-reID naming PPPP_cC_fFFFFFFF.jpg: {path}")
    pid, cam, frame = (int(g) for g in m.groups())
    if not 1 <= cam <= len(DUKE_FRAME_OFFSETS):
        raise DatasetFormatError(f"DukeMTMC-reID cameras are 1..8, got {cam}: {path}")
    return pid, cam, frame


def parse_msmt_camera(path: str) -> int:
    """1-based camera of an MSMT17 file name ``PPPP_III_CC_<date><period>_<clip>_<n>.jpg``.

    The fields separated by ``_`` are: identity, image index of that identity, camera (1..15),
    recording date with the period of the day (``0302morning``, ``0113noon``, ...), and two
    further counters; the camera is the third field.
    """
    fields = _stem(path).split("_")
    if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < 1:
        raise DatasetFormatError(
            f"file name does not follow the MSMT17 naming PPPP_III_CC_...: {path}")
    return int(fields[2])


def market_session_frames(entries: Sequence[Tuple[int, int, int]], session_offsets: str = "public") -> List[int]:
    """Frame numbers on one clock per camera for ``(camera, session, frame)`` triples.

    Session ``s`` of camera ``c`` is shifted by ``O[s]``, computed from the largest frame ``M[s']`` of
    each earlier session among ``entries`` (0 for a session without entries):
    ``"public"``: ``O[s] = M[s-1] + 2 O[s-1]`` if session ``s-1`` has entries, else ``O[s-1]`` (the
    public QAConv reader); ``"cumulative"``: ``O[s] = M[s-1] + O[s-1]``; ``O[1] = 0``.
    """
    if session_offsets not in MARKET_SESSION_OFFSETS:
        raise ValueError(f"unknown session_offsets {session_offsets!r}; valid: {', '.join(MARKET_SESSION_OFFSETS)}")
    max_frame: Dict[Tuple[int, int], int] = {}
    for cam, session, frame in entries:
        key = (cam, session)
        if frame > max_frame.get(key, -1):
            max_frame[key] = frame
    offsets: Dict[Tuple[int, int], int] = {}
    cams = {c for c, _ in max_frame}
    for cam in cams:
        last = max(s for c, s in max_frame if c == cam)
        offset = 0
        for s in range(1, last + 1):
            if s > 1 and (cam, s - 1) in max_frame:
                previous_end = max_frame[(cam, s - 1)]
                if session_offsets == "public":   # the maximum is read after session s-1 was shifted
                    previous_end += offset
                offset += previous_end
            offsets[(cam, s)] = offset
    return [frame + offsets[(cam, session)] for cam, session, frame in entries]


def market_cumulative_frames(entries: Sequence[Tuple[int, int, int]]) -> List[int]:
    """:func:`market_session_frames` with ``session_offsets="cumulative"``: the sessions of a camera abut."""
    return market_session_frames(entries, "cumulative")


def _relabel(records: List[Record]) -> Tuple[List[Record], Dict[int, int]]:
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [r._replace(pid=mapping[r.pid]) for r in records], mapping


# ----------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------

class ReIDDataset:
    """Train/query/gallery record lists with the bookkeeping every dataset shares.

    Subclasses fill ``self.train`` (original pids), ``self.query`` and ``self.gallery`` and call
    :meth:`_finish`, which drops junk and relabels the training identities.
    """

    name = "dataset"

    def __init__(self) -> None:
        self.root: str = ""
        self.train: List[Record] = []
        self.query: List[Record] = []
        self.gallery: List[Record] = []
        self.train_pid_map: Dict[int, int] = {}

    def _finish(self, train: Iterable[Record], query: Iterable[Record],
                gallery: Iterable[Record]) -> None:
        self.train, self.train_pid_map = _relabel([r for r in train if r.pid != -1])
        self.query = [r for r in query if r.pid != -1]
        self.gallery = [r for r in gallery if r.pid != -1]

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (labels are ``0..num_train_pids-1``)."""
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        """Number of distinct cameras among the training images."""
        return len({r.camid for r in self.train})

    @property
    def num_query_pids(self) -> int:
        return len({r.pid for r in self.query})

    @property
    def num_gallery_pids(self) -> int:
        return len({r.pid for r in self.gallery})

    @property
    def has_time(self) -> bool:
        """Whether the records carry time stamps."""
        return any(r.time is not None for r in self.train + self.query + self.gallery)

    def summary(self) -> str:
        """A short table of identities, images and cameras per subset."""
        lines = [f"{type(self).__name__}  {self.root}",
                 "  subset  |   ids | images | cams",
                 "  --------+-------+--------+-----"]
        for label, recs in (("train", self.train), ("query", self.query), ("gallery", self.gallery)):
            ids = len({r.pid for r in recs})
            cams = len({r.camid for r in recs})
            lines.append(f"  {label:<7} | {ids:5d} | {len(recs):6d} | {cams:4d}")
        distractors = sum(1 for r in self.gallery if r.pid == 0)
        extra = f"gallery distractors (pid 0): {distractors}; " if distractors else ""
        lines.append(f"  {extra}time stamps: {'yes' if self.has_time else 'no'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, train={len(self.train)}, "
                f"query={len(self.query)}, gallery={len(self.gallery)})")


# ----------------------------------------------------------------------------------------------
# Market-1501
# ----------------------------------------------------------------------------------------------

class Market1501(ReIDDataset):
    """Market-1501 (also the layout of the built-in synthetic camera network).

    ``root`` is the dataset folder (holding ``bounding_box_train``, ``query``,
    ``bounding_box_test``) or a folder that contains it as ``Market-1501-v15.09.15``,
    ``Market-1501`` or ``market1501``. ``session_offsets``: how the sessions of a camera are put on
    one clock, ``"public"`` (the public code's offsets, default) or ``"cumulative"`` (see the module doc).
    """

    name = "market1501"
    folder_names = ("Market-1501-v15.09.15", "Market-1501", "market1501", "Market1501",
                    os.path.join("market1501", "Market-1501-v15.09.15"))
    subdirs = ("bounding_box_train", "query", "bounding_box_test")
    fps = MARKET_FPS

    def __init__(self, root: PathLike, verbose: bool = False, session_offsets: str = "public") -> None:
        super().__init__()
        if session_offsets not in MARKET_SESSION_OFFSETS:
            raise ValueError(f"unknown session_offsets {session_offsets!r}; valid: {', '.join(MARKET_SESSION_OFFSETS)}")
        self.session_offsets = session_offsets
        self.root = _resolve_root(root, self.folder_names, _has_dirs(*self.subdirs), "Market-1501")
        parsed: Dict[str, List[Tuple[str, int, int, int, int]]] = {}
        for split, sub in zip(("train", "query", "gallery"), self.subdirs):
            items = []
            for path in _list_images(os.path.join(self.root, sub)):
                pid, cam, session, frame, _ = parse_market_name(path)
                if pid == -1:
                    continue
                items.append((path, pid, cam, session, frame))
            parsed[split] = items
        everything = parsed["train"] + parsed["query"] + parsed["gallery"]
        frames = market_session_frames([(c, s, f) for _, _, c, s, f in everything], session_offsets)
        records = [Record(path, pid, cam - 1, fr / self.fps)
                   for (path, pid, cam, _, _), fr in zip(everything, frames)]
        n_tr, n_q = len(parsed["train"]), len(parsed["query"])
        self._finish(records[:n_tr], records[n_tr:n_tr + n_q], records[n_tr + n_q:])
        if verbose:
            print(self.summary())


# ----------------------------------------------------------------------------------------------
# DukeMTMC-reID
# ----------------------------------------------------------------------------------------------

class DukeMTMCreID(ReIDDataset):
    """DukeMTMC-reID.

    ``root`` is the dataset folder (``bounding_box_train``, ``query``, ``bounding_box_test``) or a
    folder containing it as ``DukeMTMC-reID`` (also ``dukemtmc-reid/DukeMTMC-reID``).
    Times: ``(frame + DUKE_FRAME_OFFSETS[camera-1]) / 59.94`` seconds.
    """

    name = "dukemtmcreid"
    folder_names = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid",
                    os.path.join("dukemtmc-reid", "DukeMTMC-reID"),
                    os.path.join("dukemtmcreid", "DukeMTMC-reID"))
    subdirs = ("bounding_box_train", "query", "bounding_box_test")
    fps = DUKE_FPS

    def __init__(self, root: PathLike, verbose: bool = False) -> None:
        super().__init__()
        self.root = _resolve_root(root, self.folder_names, _has_dirs(*self.subdirs),
                                  "DukeMTMC-reID")
        splits = []
        for sub in self.subdirs:
            recs = []
            for path in _list_images(os.path.join(self.root, sub)):
                pid, cam, frame = parse_duke_name(path)
                recs.append(Record(path, pid, cam - 1,
                                   (frame + DUKE_FRAME_OFFSETS[cam - 1]) / self.fps))
            splits.append(recs)
        self._finish(*splits)
        if verbose:
            print(self.summary())


# ----------------------------------------------------------------------------------------------
# MSMT17
# ----------------------------------------------------------------------------------------------

_MSMT_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"),
              ("bounding_box_train", "bounding_box_test"))
_MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def _msmt_dirs(folder: str) -> Optional[Tuple[str, str]]:
    if not all(os.path.isfile(os.path.join(folder, f)) for f in _MSMT_LISTS):
        return None
    for tr, te in _MSMT_DIRS:
        if os.path.isdir(os.path.join(folder, tr)) and os.path.isdir(os.path.join(folder, te)):
            return tr, te
    return None


class MSMT17(ReIDDataset):
    """MSMT17 (V1: ``train/``, ``test/``; V2: ``mask_train_v2/``, ``mask_test_v2/``).

    ``root`` is the dataset folder (list files ``list_train.txt``, ``list_val.txt``,
    ``list_query.txt``, ``list_gallery.txt`` plus the two image folders) or a folder containing it
    as ``MSMT17_V1``, ``MSMT17_V2`` or ``MSMT17``. List lines are ``relative/path pid``: train and
    val paths are relative to the train folder, query and gallery paths to the test folder. The
    camera is the third ``_``-separated field of the file name (1..15, see
    :func:`parse_msmt_camera`). No time stamps.

    * ``combine_all=False``: train = ``list_train`` + ``list_val`` (``use_val=True``; the two lists
      share the 1,041 training identities, 32,621 images), or ``list_train`` alone.
    * ``combine_all=True``: additionally the query and gallery images, their identities offset
      past the training ones (all 4,101 identities, as in "MSMT17 (all)" cross-dataset training).
      Query and gallery remain available for evaluation.
    """

    name = "msmt17"
    folder_names = ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17",
                    os.path.join("msmt17", "MSMT17_V1"), os.path.join("msmt17", "MSMT17_V2"))

    def __init__(self, root: PathLike, combine_all: bool = False, use_val: bool = True,
                 check_files: bool = True, verbose: bool = False) -> None:
        super().__init__()
        self.root = _resolve_root(root, self.folder_names, lambda d: _msmt_dirs(d) is not None,
                                  "MSMT17")
        train_dir, test_dir = _msmt_dirs(self.root)  # type: ignore[misc]
        self.combine_all = combine_all
        train_dir = os.path.join(self.root, train_dir)
        test_dir = os.path.join(self.root, test_dir)
        read = lambda lst, base: self._read_list(os.path.join(self.root, lst), base, check_files)  # noqa: E731
        train = read("list_train.txt", train_dir)
        if use_val:
            train += read("list_val.txt", train_dir)
        query = read("list_query.txt", test_dir)
        gallery = read("list_gallery.txt", test_dir)
        if combine_all:
            shift = max((r.pid for r in train), default=-1) + 1
            train += [r._replace(pid=r.pid + shift) for r in query + gallery if r.pid >= 0]
        self._finish(train, query, gallery)
        if verbose:
            print(self.summary())

    @staticmethod
    def _read_list(list_path: str, base: str, check_files: bool) -> List[Record]:
        records = []
        with open(list_path, "r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise DatasetFormatError(
                        f"{list_path}:{lineno}: expected 'relative/path pid', got {line!r}")
                path = os.path.join(base, parts[0])
                cam = parse_msmt_camera(path)
                if check_files and not os.path.isfile(path):
                    raise FileNotFoundError(f"{list_path}:{lineno}: image file not found: {path}")
                records.append(Record(path, int(parts[1]), cam - 1, None))
        return records


# ----------------------------------------------------------------------------------------------
# Generic folders
# ----------------------------------------------------------------------------------------------

class ImageFolderDataset(ReIDDataset):
    """Any folder layout whose file names carry identity and camera.

    ``train``, ``query`` and ``gallery`` are sub-folders of ``root`` (``None`` leaves a subset
    empty); images are found recursively. ``pattern`` is a regular expression matched at the start
    of each file name without extension, with named groups:

    * ``cam`` (required): camera number; ``camid = cam - cam_base`` (``cam_base=None`` maps the
      sorted distinct camera numbers of all subsets to ``0..K-1``);
    * ``pid``: identity; without it the identity is the name of the image's parent folder;
    * ``frame`` (time = frame / ``fps``, ``fps`` required) or ``time`` (seconds), optional.

    The default pattern reads Market-1501 and DukeMTMC-reID style names (no time stamps).
    """

    name = "folder"

    def __init__(self, root: PathLike, train: Optional[str] = "bounding_box_train",
                 query: Optional[str] = "query", gallery: Optional[str] = "bounding_box_test",
                 pattern: str = r"(?P<pid>-?\d+)_c(?P<cam>\d+)", fps: Optional[float] = None,
                 cam_base: Optional[int] = 1, verbose: bool = False) -> None:
        super().__init__()
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        regex = re.compile(pattern)
        groups = set(regex.groupindex)
        if "cam" not in groups:
            raise ValueError(f"pattern needs a named group 'cam': {pattern!r}")
        if "frame" in groups and fps is None:
            raise ValueError("pattern has a 'frame' group: give fps to turn frames into seconds")
        raw: List[List[Tuple[str, int, int, Optional[float]]]] = []
        for sub in (train, query, gallery):
            items: List[Tuple[str, int, int, Optional[float]]] = []
            if sub is not None:
                folder = os.path.join(self.root, sub)
                for path in _list_images(folder, recursive=True):
                    m = regex.match(_stem(path))
                    if m is None:
                        raise DatasetFormatError(
                            f"file name does not match the pattern {pattern!r}: {path}")
                    try:
                        if "pid" in groups:
                            pid = int(m.group("pid"))
                        else:
                            pid = int(os.path.basename(os.path.dirname(path)))
                        cam = int(m.group("cam"))
                        t: Optional[float] = None
                        if "time" in groups and m.group("time") is not None:
                            t = float(m.group("time"))
                        elif "frame" in groups and m.group("frame") is not None:
                            t = int(m.group("frame")) / float(fps)  # type: ignore[arg-type]
                    except (TypeError, ValueError) as exc:
                        raise DatasetFormatError(
                            f"cannot read identity/camera/time from {path}: {exc}") from exc
                    items.append((path, pid, cam, t))
            raw.append(items)
        if cam_base is None:
            cams = sorted({c for items in raw for _, _, c, _ in items})
            cam_map = {c: i for i, c in enumerate(cams)}
        else:
            cam_map = None
        splits = []
        for items in raw:
            recs = []
            for path, pid, cam, t in items:
                camid = cam_map[cam] if cam_map is not None else cam - int(cam_base)  # type: ignore[arg-type]
                if camid < 0:
                    raise DatasetFormatError(f"camera {cam} is below cam_base={cam_base}: {path}")
                recs.append(Record(path, pid, camid, t))
            splits.append(recs)
        self._finish(*splits)
        if verbose:
            print(self.summary())


DATASETS: Dict[str, type] = {
    "market1501": Market1501,
    "market": Market1501,
    "dukemtmcreid": DukeMTMCreID,
    "dukemtmc": DukeMTMCreID,
    "duke": DukeMTMCreID,
    "msmt17": MSMT17,
    "msmt": MSMT17,
    "folder": ImageFolderDataset,
}


def build_dataset(name: str, root: PathLike, **kwargs) -> ReIDDataset:
    """Dataset by name (``market1501``, ``duke``/``dukemtmcreid``, ``msmt17``, ``folder``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(set(DATASETS))}")
    return DATASETS[key](root, **kwargs)
