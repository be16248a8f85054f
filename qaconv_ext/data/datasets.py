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

Every reader takes ``splits`` (default all three): the subsets to read; the others stay empty and
their folders need not exist, so a test-only copy (no training folder) reads with
``splits=("query", "gallery")`` for evaluation. A split that is read but has no usable image raises
:class:`DatasetFormatError` naming its folder. ``skip_bad_images=True`` decodes every image of the
splits read once and leaves out those that cannot be read (``skipped_images`` lists them, ``summary()``
counts them); without it, an unreadable image raises :class:`~qaconv_ext.data.ImageReadError` naming its
path when it is loaded.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .records import Record, partition_readable

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
    "SPLITS",
    "build_dataset",
]

PathLike = Union[str, "os.PathLike[str]"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
#: The subsets every dataset has, in this order.
SPLITS = ("train", "query", "gallery")
_TEST_ONLY_HINT = "a test-only copy reads with splits=('query', 'gallery')"
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


def _check_splits(splits: Sequence[str]) -> Tuple[str, ...]:
    out = tuple(splits)
    if not out or any(s not in SPLITS for s in out) or len(set(out)) != len(out):
        raise ValueError(f"splits: expected distinct names among {SPLITS}, got {out}")
    return out


def _resolve_root(root: PathLike, folder_names: Sequence[str],
                  missing: Callable[[str], Tuple[List[str], List[str]]], dataset: str) -> str:
    """``root`` itself when it is the dataset folder, else the first ``root/<name>`` that is.

    ``missing(folder)`` returns ``(absent, present)``: the required entries (sub-folders, list files)
    that ``folder`` lacks and those it has. When no candidate has them all, the error names what the
    most complete candidate lacks (and how to read a copy without the training split)."""
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset}: root folder not found: {root}")
    tried = []
    best: Optional[Tuple[int, str, List[str]]] = None
    for cand in [root] + [os.path.join(root, name) for name in folder_names]:
        tried.append(cand)
        if not os.path.isdir(cand):
            continue
        absent, present = missing(cand)
        if not absent:
            return cand
        if present and (best is None or len(absent) < best[0]):
            best = (len(absent), cand, absent)
    if best is None:
        raise FileNotFoundError(f"{dataset}: no dataset folder found; looked at: " + ", ".join(tried))
    _, cand, absent = best
    train_part = any(a.split(" ")[0].rstrip("/") in _TRAIN_ENTRIES for a in absent)
    hint = f" (the training split; {_TEST_ONLY_HINT})" if train_part else ""
    raise FileNotFoundError(f"{dataset}: {cand} has no {', '.join(absent)}{hint}")


# entries that only the training split needs (named in the hint for test-only copies)
_TRAIN_ENTRIES = {"bounding_box_train", "list_train.txt", "list_val.txt", "train", "mask_train_v2"}


def _need_dirs(*names: str) -> Callable[[str], Tuple[List[str], List[str]]]:
    def missing(d: str) -> Tuple[List[str], List[str]]:
        absent = [n + "/" for n in names if not os.path.isdir(os.path.join(d, n))]
        present = [n + "/" for n in names if os.path.isdir(os.path.join(d, n))]
        return absent, present
    return missing


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

    Subclasses read the splits named in ``self.splits`` and call :meth:`_finish` with the records
    (original pids), which drops junk (and, with ``skip_bad_images``, unreadable images), checks that
    every split read has images and relabels the training identities.
    """

    name = "dataset"
    display_name = "dataset"

    def __init__(self, splits: Sequence[str] = SPLITS, skip_bad_images: bool = False) -> None:
        self.root: str = ""
        self.splits: Tuple[str, ...] = _check_splits(splits)
        self.skip_bad_images = bool(skip_bad_images)
        self.train: List[Record] = []
        self.query: List[Record] = []
        self.gallery: List[Record] = []
        self.train_pid_map: Dict[int, int] = {}
        self.skipped_images: List[Tuple[str, str]] = []

    def _finish(self, train: Iterable[Record], query: Iterable[Record], gallery: Iterable[Record],
                sources: Optional[Dict[str, str]] = None, junk: Optional[Dict[str, int]] = None) -> None:
        """Drop junk (pid -1) and, with ``skip_bad_images``, unreadable images; relabel the training
        identities. ``sources``: the folder or list file of each split, named when a split read has no
        usable image; ``junk``: junk images a reader dropped already, per split."""
        subsets = {}
        for split, recs in zip(SPLITS, (train, query, gallery)):
            recs = list(recs)
            dropped = sum(1 for r in recs if r.pid == -1) + (junk or {}).get(split, 0)
            kept = [r for r in recs if r.pid != -1]
            unreadable: List[Tuple[str, str]] = []
            if self.skip_bad_images and split in self.splits:
                kept, unreadable = partition_readable(kept)
                self.skipped_images.extend(unreadable)
            if split in self.splits and not kept:
                where = (sources or {}).get(split, f"the {split} split")
                if not dropped and not unreadable:
                    kinds = f" (no {'/'.join(IMAGE_EXTENSIONS)} files)" if os.path.isdir(where) else ""
                    raise DatasetFormatError(f"{self.display_name}: no images in {where}{kinds}")
                why = [f"{len(unreadable)} unreadable"] if unreadable else []
                why += [f"{dropped} junk with pid -1"] if dropped else []
                raise DatasetFormatError(f"{self.display_name}: no usable images in {where} ({', '.join(why)})")
            subsets[split] = kept
        self.train, self.train_pid_map = _relabel(subsets["train"])
        self.query = subsets["query"]
        self.gallery = subsets["gallery"]

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
        if self.skipped_images:
            extra += f"unreadable images skipped: {len(self.skipped_images)}; "
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
    ``bounding_box_test``; only those of ``splits``) or a folder that contains it as
    ``Market-1501-v15.09.15``, ``Market-1501`` or ``market1501``. ``session_offsets``: how the sessions
    of a camera are put on one clock, ``"public"`` (the public code's offsets, default) or
    ``"cumulative"`` (see the module doc); offsets are computed over the splits read. ``splits``,
    ``skip_bad_images``: see the module doc.
    """

    name = "market1501"
    display_name = "Market-1501"
    folder_names = ("Market-1501-v15.09.15", "Market-1501", "market1501", "Market1501",
                    os.path.join("market1501", "Market-1501-v15.09.15"))
    subdirs = ("bounding_box_train", "query", "bounding_box_test")
    fps = MARKET_FPS

    def __init__(self, root: PathLike, verbose: bool = False, session_offsets: str = "public", *,
                 splits: Sequence[str] = SPLITS, skip_bad_images: bool = False) -> None:
        if session_offsets not in MARKET_SESSION_OFFSETS:
            raise ValueError(f"unknown session_offsets {session_offsets!r}; valid: {', '.join(MARKET_SESSION_OFFSETS)}")
        super().__init__(splits, skip_bad_images)
        self.session_offsets = session_offsets
        dirs = dict(zip(SPLITS, self.subdirs))
        self.root = _resolve_root(root, self.folder_names, _need_dirs(*(dirs[s] for s in self.splits)),
                                  self.display_name)
        parsed: Dict[str, List[Tuple[str, int, int, int, int]]] = {s: [] for s in SPLITS}
        junk = dict.fromkeys(SPLITS, 0)
        for split in self.splits:
            for path in _list_images(os.path.join(self.root, dirs[split])):
                pid, cam, session, frame, _ = parse_market_name(path)
                if pid == -1:
                    junk[split] += 1
                    continue
                parsed[split].append((path, pid, cam, session, frame))
        everything = parsed["train"] + parsed["query"] + parsed["gallery"]
        frames = market_session_frames([(c, s, f) for _, _, c, s, f in everything], session_offsets)
        records = [Record(path, pid, cam - 1, fr / self.fps)
                   for (path, pid, cam, _, _), fr in zip(everything, frames)]
        n_tr, n_q = len(parsed["train"]), len(parsed["query"])
        self._finish(records[:n_tr], records[n_tr:n_tr + n_q], records[n_tr + n_q:],
                     {s: os.path.join(self.root, dirs[s]) for s in SPLITS}, junk)
        if verbose:
            print(self.summary())


# ----------------------------------------------------------------------------------------------
# DukeMTMC-reID
# ----------------------------------------------------------------------------------------------

class DukeMTMCreID(ReIDDataset):
    """DukeMTMC-reID.

    ``root`` is the dataset folder (``bounding_box_train``, ``query``, ``bounding_box_test``) or a
    folder containing it as ``DukeMTMC-reID`` (also ``dukemtmc-reid/DukeMTMC-reID``).
    Times: ``(frame + DUKE_FRAME_OFFSETS[camera-1]) / 59.94`` seconds. ``splits``,
    ``skip_bad_images``: see the module doc.
    """

    name = "dukemtmcreid"
    display_name = "DukeMTMC-reID"
    folder_names = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid",
                    os.path.join("dukemtmc-reid", "DukeMTMC-reID"),
                    os.path.join("dukemtmcreid", "DukeMTMC-reID"))
    subdirs = ("bounding_box_train", "query", "bounding_box_test")
    fps = DUKE_FPS

    def __init__(self, root: PathLike, verbose: bool = False, *, splits: Sequence[str] = SPLITS,
                 skip_bad_images: bool = False) -> None:
        super().__init__(splits, skip_bad_images)
        dirs = dict(zip(SPLITS, self.subdirs))
        self.root = _resolve_root(root, self.folder_names, _need_dirs(*(dirs[s] for s in self.splits)),
                                  self.display_name)
        subsets = []
        for split in SPLITS:
            recs = []
            if split in self.splits:
                for path in _list_images(os.path.join(self.root, dirs[split])):
                    pid, cam, frame = parse_duke_name(path)
                    recs.append(Record(path, pid, cam - 1,
                                       (frame + DUKE_FRAME_OFFSETS[cam - 1]) / self.fps))
            subsets.append(recs)
        self._finish(*subsets, sources={s: os.path.join(self.root, dirs[s]) for s in SPLITS})
        if verbose:
            print(self.summary())


# ----------------------------------------------------------------------------------------------
# MSMT17
# ----------------------------------------------------------------------------------------------

_MSMT_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"),
              ("bounding_box_train", "bounding_box_test"))
_MSMT_LISTS = {"train": "list_train.txt", "val": "list_val.txt", "query": "list_query.txt",
               "gallery": "list_gallery.txt"}


def _msmt_lists(splits: Sequence[str], use_val: bool) -> List[str]:
    """The list files that reading ``splits`` needs."""
    keys = [k for k in ("train", "val") if "train" in splits and (k == "train" or use_val)]
    keys += [k for k in ("query", "gallery") if k in splits]
    return [_MSMT_LISTS[k] for k in keys]


def _msmt_dirs(folder: str, need_train: bool, need_test: bool) -> Optional[Tuple[str, str]]:
    """The first known ``(train, test)`` folder pair whose needed members exist in ``folder``."""
    for tr, te in _MSMT_DIRS:
        if ((not need_train or os.path.isdir(os.path.join(folder, tr)))
                and (not need_test or os.path.isdir(os.path.join(folder, te)))):
            return tr, te
    return None


def _msmt_missing(splits: Sequence[str], use_val: bool) -> Callable[[str], Tuple[List[str], List[str]]]:
    need_train = "train" in splits
    need_test = "query" in splits or "gallery" in splits

    def missing(folder: str) -> Tuple[List[str], List[str]]:
        lists = _msmt_lists(splits, use_val)
        absent = [f for f in lists if not os.path.isfile(os.path.join(folder, f))]
        present = [f for f in lists if f not in absent]
        for need, side in ((need_train, 0), (need_test, 1)):
            if not need:
                continue
            names = [pair[side] + "/" for pair in _MSMT_DIRS]
            found = [n for n in names if os.path.isdir(os.path.join(folder, n))]
            if found:
                present.extend(found)
            else:
                absent.append(f"{names[0]} (or {', '.join(names[1:])})")
        if not absent and _msmt_dirs(folder, need_train, need_test) is None:
            absent.append("a matching pair of train/test folders (" +
                          ", ".join(f"{tr}/ + {te}/" for tr, te in _MSMT_DIRS) + ")")
        return absent, present
    return missing


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

    ``splits``, ``skip_bad_images``: see the module doc (only the list files and the image folder of
    the splits read need to exist; ``combine_all`` reads all three).
    """

    name = "msmt17"
    display_name = "MSMT17"
    folder_names = ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17",
                    os.path.join("msmt17", "MSMT17_V1"), os.path.join("msmt17", "MSMT17_V2"))

    def __init__(self, root: PathLike, combine_all: bool = False, use_val: bool = True,
                 check_files: bool = True, verbose: bool = False, *, splits: Sequence[str] = SPLITS,
                 skip_bad_images: bool = False) -> None:
        super().__init__(splits, skip_bad_images)
        if combine_all and set(self.splits) != set(SPLITS):
            raise ValueError(f"combine_all: trains on all three splits, but splits={self.splits}")
        self.root = _resolve_root(root, self.folder_names, _msmt_missing(self.splits, use_val), self.display_name)
        need_train = "train" in self.splits
        pair = _msmt_dirs(self.root, need_train, "query" in self.splits or "gallery" in self.splits)
        train_dir, test_dir = (os.path.join(self.root, d) for d in pair)  # type: ignore[union-attr]
        self.combine_all = combine_all
        read = lambda lst, base: self._read_list(os.path.join(self.root, lst), base, check_files)  # noqa: E731
        train: List[Record] = []
        query: List[Record] = []
        gallery: List[Record] = []
        if need_train:
            train = read("list_train.txt", train_dir)
            if use_val:
                train += read("list_val.txt", train_dir)
        if "query" in self.splits:
            query = read("list_query.txt", test_dir)
        if "gallery" in self.splits:
            gallery = read("list_gallery.txt", test_dir)
        if combine_all:
            shift = max((r.pid for r in train), default=-1) + 1
            train += [r._replace(pid=r.pid + shift) for r in query + gallery if r.pid >= 0]
        lists = {s: os.path.join(self.root, _MSMT_LISTS[s]) for s in ("train", "query", "gallery")}
        if use_val:
            lists["train"] += " + " + _MSMT_LISTS["val"]
        self._finish(train, query, gallery, sources=lists)
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
      sorted distinct camera numbers of all subsets read to ``0..K-1``);
    * ``pid``: identity; without it the identity is the name of the image's parent folder;
    * ``frame`` (time = frame / ``fps``, ``fps`` required) or ``time`` (seconds), optional.

    The default pattern reads Market-1501 and DukeMTMC-reID style names (no time stamps).
    ``splits``, ``skip_bad_images``: see the module doc (a split left out of ``splits`` is read as if
    its folder were ``None``).
    """

    name = "folder"
    display_name = "folder dataset"

    def __init__(self, root: PathLike, train: Optional[str] = "bounding_box_train",
                 query: Optional[str] = "query", gallery: Optional[str] = "bounding_box_test",
                 pattern: str = r"(?P<pid>-?\d+)_c(?P<cam>\d+)", fps: Optional[float] = None,
                 cam_base: Optional[int] = 1, verbose: bool = False, *, splits: Sequence[str] = SPLITS,
                 skip_bad_images: bool = False) -> None:
        super().__init__(splits, skip_bad_images)
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
        folders = {s: (os.path.join(self.root, sub) if sub is not None and s in self.splits else None)
                   for s, sub in zip(SPLITS, (train, query, gallery))}
        self.splits = tuple(s for s in SPLITS if folders[s] is not None)
        for split, folder in folders.items():
            items: List[Tuple[str, int, int, Optional[float]]] = []
            if folder is not None:
                if not os.path.isdir(folder):
                    hint = f"; {_TEST_ONLY_HINT} or train=None" if split == "train" else ""
                    label = "training" if split == "train" else split
                    raise FileNotFoundError(f"{self.display_name}: {folder} not found (the {label} split{hint})")
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
        subsets = []
        for items in raw:
            recs = []
            for path, pid, cam, t in items:
                camid = cam_map[cam] if cam_map is not None else cam - int(cam_base)  # type: ignore[arg-type]
                if camid < 0:
                    raise DatasetFormatError(f"camera {cam} is below cam_base={cam_base}: {path}")
                recs.append(Record(path, pid, camid, t))
            subsets.append(recs)
        self._finish(*subsets, sources={s: f for s, f in folders.items() if f is not None})
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
