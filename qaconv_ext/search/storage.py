"""The files of a gallery index and the rules that keep it valid.

An index is a folder::

    manifest.json      what is committed: format, count, map shape, model identity, segments (plain JSON)
    maps.f16           feature maps, float16 little-endian, C order [count, d, h, w] (np.memmap-able)
    descriptors.f32    global descriptors, float32 little-endian [count, d]
    records.jsonl      one JSON object per map: {"path", "pid", "camid", "time"}

Readers trust only the manifest: they use the first ``count`` maps, descriptors and records and ignore
anything behind them. Appending writes after the committed bytes (first cutting off what an
interrupted append may have left there), flushes the files to disk, then replaces ``manifest.json``
atomically (a temporary file in the folder, fsync, ``os.replace``). A crash at any point before the
replace leaves the previous index valid; after it, the new one. Each append is a *segment* whose
SHA-256 digests the manifest keeps, so damage inside the data can be detected.

Nothing is read through pickle.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "FORMAT", "MANIFEST", "MAPS_FILE", "DESCRIPTORS_FILE", "RECORDS_FILE",
    "GalleryIndexError", "read_manifest", "write_manifest", "locked", "SegmentWriter",
    "map_nbytes", "read_records", "check_sizes", "committed_bytes", "record_line", "now",
]

FORMAT = "qaconv-ext-index/1"
MANIFEST = "manifest.json"
MAPS_FILE = "maps.f16"
DESCRIPTORS_FILE = "descriptors.f32"
RECORDS_FILE = "records.jsonl"
LOCK_FILE = ".lock"

MAPS_DTYPE = np.dtype("<f2")
DESCRIPTORS_DTYPE = np.dtype("<f4")


class GalleryIndexError(ValueError):
    """A gallery index that is missing, damaged, made by another model, or used wrongly (the message
    names the index and the problem)."""


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def map_nbytes(map_shape: Sequence[int]) -> int:
    """Bytes of one stored map."""
    return int(np.prod(map_shape)) * MAPS_DTYPE.itemsize


def fsync_dir(folder: str) -> None:
    """Make renames inside ``folder`` durable where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(folder: str) -> Dict[str, Any]:
    """The manifest of the index at ``folder``, checked for its format and required fields."""
    if not os.path.exists(folder):
        raise GalleryIndexError(f"gallery index not found: {folder}")
    if not os.path.isdir(folder):
        raise GalleryIndexError(f"{folder} is a file, not a gallery index folder")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise GalleryIndexError(f"{folder} is not a gallery index (no {MANIFEST})")
    try:
        with open(path, "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GalleryIndexError(f"{folder}: {MANIFEST} is damaged ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise GalleryIndexError(f"{folder}: {MANIFEST} is not a {FORMAT} manifest (format {got!r})")
    try:
        count = int(manifest["count"])
        shape = [int(x) for x in manifest["map_shape"]]
        segs = manifest["segments"]
        int(manifest["records_bytes"])
        if count < 0 or len(shape) != 3 or min(shape) < 1 or sum(int(s["count"]) for s in segs) != count:
            raise ValueError("inconsistent count, map shape or segments")
    except (KeyError, TypeError, ValueError) as exc:
        raise GalleryIndexError(f"{folder}: {MANIFEST} is damaged ({exc})") from None
    return manifest


def write_manifest(folder: str, manifest: Dict[str, Any]) -> None:
    """Replace ``folder/manifest.json`` atomically (temporary file, fsync, ``os.replace``, folder fsync)."""
    fd, tmp = tempfile.mkstemp(prefix="." + MANIFEST + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(folder, MANIFEST))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    """Hold an exclusive lock on the index at ``folder`` (one writer at a time; readers do not lock)."""
    import fcntl

    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def record_line(path: Optional[str], pid: Optional[int], camid: Optional[int], time: Optional[float]) -> bytes:
    """One line of ``records.jsonl``."""
    obj = {"path": path, "pid": None if pid is None else int(pid), "camid": None if camid is None else int(camid),
           "time": None if time is None else float(time)}
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def committed_bytes(manifest: Dict[str, Any]) -> Dict[str, int]:
    """Bytes of each data file that the manifest commits (the rest of a file, if any, is the leftover
    of an interrupted append)."""
    count = int(manifest["count"])
    shape = manifest["map_shape"]
    return {MAPS_FILE: count * map_nbytes(shape),
            DESCRIPTORS_FILE: count * int(shape[0]) * DESCRIPTORS_DTYPE.itemsize,
            RECORDS_FILE: int(manifest["records_bytes"])}


def check_sizes(folder: str, manifest: Dict[str, Any]) -> None:
    """Each data file holds at least what the manifest commits (more is the leftover of an
    interrupted append and is ignored)."""
    count = int(manifest["count"])
    for name, nbytes in committed_bytes(manifest).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            if nbytes == 0:
                continue
            raise GalleryIndexError(f"{folder}: {name} is missing (the manifest commits {count} maps)")
        have = os.path.getsize(path)
        if have < nbytes:
            raise GalleryIndexError(f"{folder}: {name} is truncated: {have} bytes, the manifest's {count} maps "
                                    f"need {nbytes}")


def _digest_range(path: str, start: int, stop: int, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        left = stop - start
        while left > 0:
            buf = fh.read(min(block, left))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def verify_segments(folder: str, manifest: Dict[str, Any], files: Sequence[str] = (MAPS_FILE, DESCRIPTORS_FILE)
                    ) -> None:
    """Recompute the SHA-256 of every committed segment of ``files``; raise on the first mismatch."""
    shape = manifest["map_shape"]
    unit = {MAPS_FILE: map_nbytes(shape), DESCRIPTORS_FILE: int(shape[0]) * DESCRIPTORS_DTYPE.itemsize}
    key = {MAPS_FILE: "maps_sha256", DESCRIPTORS_FILE: "descriptors_sha256", RECORDS_FILE: "records_sha256"}
    for seg in manifest["segments"]:
        for name in files:
            if name == RECORDS_FILE:
                start, stop = int(seg["records_offset"]), int(seg["records_offset"]) + int(seg["records_bytes"])
            else:
                start, stop = int(seg["start"]) * unit[name], (int(seg["start"]) + int(seg["count"])) * unit[name]
            if _digest_range(os.path.join(folder, name), start, stop) != seg[key[name]]:
                raise GalleryIndexError(f"{folder}: {name} is damaged: maps {seg['start']}.."
                                        f"{int(seg['start']) + int(seg['count']) - 1} do not match their checksum")


def read_records(folder: str, manifest: Dict[str, Any]) -> List[Tuple[Optional[str], Optional[int], Optional[int],
                                                                     Optional[float]]]:
    """The committed records ``(path, pid, camid, time)``, checked against the segments' checksums."""
    count, nbytes = int(manifest["count"]), int(manifest["records_bytes"])
    if nbytes == 0:
        if count:
            raise GalleryIndexError(f"{folder}: {RECORDS_FILE} is empty but the manifest commits {count} maps")
        return []
    with open(os.path.join(folder, RECORDS_FILE), "rb") as fh:
        data = fh.read(nbytes)
    for seg in manifest["segments"]:
        o, n = int(seg["records_offset"]), int(seg["records_bytes"])
        if hashlib.sha256(data[o:o + n]).hexdigest() != seg["records_sha256"]:
            raise GalleryIndexError(f"{folder}: {RECORDS_FILE} is damaged: the records of maps {seg['start']}.."
                                    f"{int(seg['start']) + int(seg['count']) - 1} do not match their checksum")
    out = []
    for line in data.splitlines():
        obj = json.loads(line)
        out.append((obj.get("path"), obj.get("pid"), obj.get("camid"), obj.get("time")))
    if len(out) != count:
        raise GalleryIndexError(f"{folder}: {RECORDS_FILE} holds {len(out)} records, the manifest commits {count}")
    return out


class SegmentWriter:
    """Writes one segment after the committed end of an index's files; :meth:`finish` returns the
    segment's manifest entry (the caller then commits the manifest), :meth:`abort` cuts the files back.

    The files are cut to the committed sizes first, which drops the leftovers of an interrupted append.
    """

    def __init__(self, folder: str, manifest: Dict[str, Any]) -> None:
        self.folder = folder
        self.start = int(manifest["count"])
        self.map_shape = tuple(int(x) for x in manifest["map_shape"])
        self.count = 0
        self.records_offset = int(manifest["records_bytes"])
        self.records_bytes = 0
        d = self.map_shape[0]
        self._sizes = {MAPS_FILE: self.start * map_nbytes(self.map_shape),
                       DESCRIPTORS_FILE: self.start * d * DESCRIPTORS_DTYPE.itemsize,
                       RECORDS_FILE: self.records_offset}
        self._files: Dict[str, Any] = {}
        self._hash = {name: hashlib.sha256() for name in self._sizes}
        try:
            for name, size in self._sizes.items():
                fh = open(os.path.join(folder, name), "ab+")
                self._files[name] = fh
                fh.truncate(size)
                fh.seek(size)
        except BaseException:
            self._close()
            raise

    def write(self, maps: np.ndarray, descriptors: np.ndarray, records: bytes) -> None:
        """Append ``maps`` ``[n, d, h, w]`` (float16), their ``descriptors`` ``[n, d]`` (float32) and
        ``n`` record lines."""
        n = maps.shape[0]
        parts = {MAPS_FILE: np.ascontiguousarray(maps, dtype=MAPS_DTYPE).tobytes(),
                 DESCRIPTORS_FILE: np.ascontiguousarray(descriptors, dtype=DESCRIPTORS_DTYPE).tobytes(),
                 RECORDS_FILE: records}
        for name, data in parts.items():
            self._files[name].write(data)
            self._hash[name].update(data)
        self.count += n
        self.records_bytes += len(records)

    def finish(self) -> Dict[str, Any]:
        """Flush the files to disk and return the segment entry for the manifest."""
        for fh in self._files.values():
            fh.flush()
            os.fsync(fh.fileno())
        self._close()
        return {"start": self.start, "count": self.count, "records_offset": self.records_offset,
                "records_bytes": self.records_bytes, "maps_sha256": self._hash[MAPS_FILE].hexdigest(),
                "descriptors_sha256": self._hash[DESCRIPTORS_FILE].hexdigest(),
                "records_sha256": self._hash[RECORDS_FILE].hexdigest(), "added": now()}

    def abort(self) -> None:
        """Cut the files back to the committed sizes (best effort; readers ignore the bytes anyway)."""
        self._close()
        for name, size in self._sizes.items():
            with contextlib.suppress(OSError):
                os.truncate(os.path.join(self.folder, name), size)

    def _close(self) -> None:
        for fh in self._files.values():
            with contextlib.suppress(OSError):
                fh.close()
        self._files = {}
