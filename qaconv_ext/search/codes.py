"""The centroid codebook and codes of a gallery index on disk, and the rules that keep them valid.

An index with a codebook holds two more files, named in the manifest's ``codebook`` entry::

    codebook.<tag>.f32   the centroids, float32 little-endian [K, d] (unit vectors)
    codes.<tag>.u16      one uint16 centroid id per map location, little-endian [count, h * w]

The entry also records how the codebook was trained (K, seed, iterations, sample size, the training
sample's mean quantisation error), the codebook's SHA-256, and the codes in segments (start, count,
SHA-256, summed quantisation error), like the maps. An append encodes the new maps with the existing
codebook and commits their codes in the same manifest replace as the maps (see
:mod:`qaconv_ext.search.storage`); training a new codebook writes files with a new tag, commits the
manifest, then deletes the old files, so a reader never sees a codebook with codes of another. An index
without a ``codebook`` entry is a plain index.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import math
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import numpy as np
import torch

from .centroids import (
    CODES_DTYPE,
    RETRAIN_RATIO,
    default_codebook_size,
    default_sample_size,
    encode_maps,
    location_vectors,
    spherical_kmeans,
)
from .storage import GalleryIndexError, now

__all__ = ["CODEBOOK_DTYPE", "new_tag", "check_codes", "read_codebook", "codes_coverage", "CodesWriter",
           "verify_codes", "codebook_drift", "codebook_bytes", "write_codebook", "remove_codebook_files",
           "iter_codes", "train_codes"]

CODEBOOK_DTYPE = np.dtype("<f4")


def new_tag() -> str:
    """A fresh tag for a codebook's file names."""
    return secrets.token_hex(4)


def _locations(manifest: Dict[str, Any]) -> int:
    _, h, w = (int(x) for x in manifest["map_shape"])
    return h * w


def codes_coverage(manifest: Dict[str, Any]) -> int:
    """How many of the first maps the committed codes cover (the count, unless an index of this format was
    appended to by a version that writes no codes)."""
    return sum(int(s["count"]) for s in manifest["codebook"]["segments"])


def codebook_bytes(manifest: Dict[str, Any]) -> Dict[str, int]:
    """Bytes of the codebook's two files that the manifest commits (none without a codebook)."""
    cb = manifest.get("codebook")
    if cb is None:
        return {}
    return {str(cb["codebook_file"]): int(cb["k"]) * int(cb["dim"]) * CODEBOOK_DTYPE.itemsize,
            str(cb["codes_file"]): codes_coverage(manifest) * _locations(manifest) * CODES_DTYPE.itemsize}


def check_codes(folder: str, manifest: Dict[str, Any]) -> None:
    """The codebook entry is well formed and its files hold the bytes it commits."""
    cb = manifest.get("codebook")
    if cb is None:
        return
    try:
        k, d = int(cb["k"]), int(cb["dim"])
        names = (str(cb["codebook_file"]), str(cb["codes_file"]))
        covered = codes_coverage(manifest)
        if not 1 <= k <= 1 << 16 or d != int(manifest["map_shape"][0]) or covered > int(manifest["count"]):
            raise ValueError("inconsistent K, dimension or code segments")
        if any(os.path.basename(n) != n for n in names):
            raise ValueError("file names with folders")
    except (KeyError, TypeError, ValueError) as exc:
        raise GalleryIndexError(f"{folder}: the manifest's codebook entry is damaged ({exc})") from None
    for name, nbytes in codebook_bytes(manifest).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise GalleryIndexError(f"{folder}: {name} is missing (the manifest commits a codebook of {k} centroids)")
        have = os.path.getsize(path)
        if have < nbytes or (name == names[0] and have != nbytes):
            raise GalleryIndexError(f"{folder}: {name} holds {have} bytes, the manifest's codebook needs {nbytes}")


def read_codebook(folder: str, manifest: Dict[str, Any]) -> torch.Tensor:
    """The centroids ``[K, d]`` (float32), checked against their SHA-256."""
    cb = manifest["codebook"]
    with open(os.path.join(folder, cb["codebook_file"]), "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != cb["codebook_sha256"]:
        raise GalleryIndexError(f"{folder}: {cb['codebook_file']} is damaged: it does not match its checksum")
    arr = np.frombuffer(data, dtype=CODEBOOK_DTYPE).reshape(int(cb["k"]), int(cb["dim"]))
    return torch.from_numpy(arr.astype(np.float32))


def verify_codes(folder: str, manifest: Dict[str, Any]) -> None:
    """Recompute the codebook's and every codes segment's SHA-256; raise on the first mismatch."""
    cb = manifest.get("codebook")
    if cb is None:
        return
    read_codebook(folder, manifest)
    row = _locations(manifest) * CODES_DTYPE.itemsize
    with open(os.path.join(folder, cb["codes_file"]), "rb") as fh:
        for seg in cb["segments"]:
            start, count = int(seg["start"]), int(seg["count"])
            fh.seek(start * row)
            h = hashlib.sha256()
            left = count * row
            while left > 0:
                buf = fh.read(min(left, 1 << 24))
                if not buf:
                    break
                h.update(buf)
                left -= len(buf)
            if h.hexdigest() != seg["sha256"]:
                raise GalleryIndexError(f"{folder}: {cb['codes_file']} is damaged: the codes of maps {start}.."
                                        f"{start + count - 1} do not match their checksum")


def codebook_drift(manifest: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """How well the codebook fits the maps appended after it was trained: ``{"train_error", "appended_maps",
    "appended_error", "ratio", "retrain"}`` (errors: mean ``1 - cosine`` of a location vector with its
    centroid; ``retrain`` when the appended maps' error exceeds the training sample's by
    :data:`RETRAIN_RATIO`); ``None`` without a codebook."""
    cb = manifest.get("codebook")
    if cb is None:
        return None
    train = float(cb["train_error"])
    appended = [s for s in cb["segments"] if int(s["start"]) >= int(cb["trained_on"])]
    n = sum(int(s["count"]) for s in appended)
    err = sum(float(s["error"]) for s in appended) / (n * _locations(manifest)) if n else None
    if err is None:
        ratio = None
    else:  # a lossless codebook (error 0) makes any error in the appended maps an infinite ratio
        ratio = err / train if train > 0 else (math.inf if err > 0 else 1.0)
    return {"train_error": train, "appended_maps": n, "appended_error": err, "ratio": ratio,
            "retrain": bool(ratio is not None and ratio > RETRAIN_RATIO)}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_codebook(folder: str, centroids: torch.Tensor, info: Dict[str, Any]) -> Dict[str, Any]:
    """Write the centroids to a new file in ``folder`` (flushed to disk); returns the manifest's codebook
    entry without codes segments (``info``: k-means settings and ``train_error``, ``trained_on``)."""
    tag = new_tag()
    data = np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=CODEBOOK_DTYPE).tobytes()
    name = f"codebook.{tag}.f32"
    with open(os.path.join(folder, name), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    k, d = centroids.shape
    return {"k": int(k), "dim": int(d), "codebook_file": name, "codes_file": f"codes.{tag}.u16",
            "codebook_sha256": _digest(data), **info, "trained": now(), "segments": []}


def remove_codebook_files(folder: str, entry: Optional[Dict[str, Any]]) -> None:
    """Delete the files of a codebook entry that is no longer committed (best effort)."""
    if entry is None:
        return
    for key in ("codebook_file", "codes_file"):
        with contextlib.suppress(OSError, KeyError):
            os.unlink(os.path.join(folder, entry[key]))


class CodesWriter:
    """Encodes maps with the index's codebook and writes their codes after the committed codes;
    :meth:`finish` returns the manifest's new codebook entry (with one more segment), :meth:`abort` cuts the
    file back. Like :class:`~qaconv_ext.search.storage.SegmentWriter`, it first cuts what an interrupted
    append left behind."""

    def __init__(self, folder: str, entry: Dict[str, Any], centroids: torch.Tensor, start: int,
                 locations: int) -> None:
        self.entry, self.centroids, self.start = entry, centroids, int(start)
        self.path = os.path.join(folder, entry["codes_file"])
        self.size = self.start * locations * CODES_DTYPE.itemsize
        self.count, self.error = 0, 0.0
        self._hash = hashlib.sha256()
        self._fh = open(self.path, "ab+")
        try:
            self._fh.truncate(self.size)
            self._fh.seek(self.size)
        except BaseException:
            self._fh.close()
            raise

    @classmethod
    def for_index(cls, folder: str, manifest: Dict[str, Any]) -> Optional["CodesWriter"]:
        """The writer of an append to the index at ``folder`` (``None`` without a codebook); refuses an
        index whose codes do not cover every map."""
        cb = manifest.get("codebook")
        if cb is None:
            return None
        if codes_coverage(manifest) != int(manifest["count"]):
            raise GalleryIndexError(f"{folder}: the codes cover {codes_coverage(manifest)} of "
                                    f"{manifest['count']} maps; train the codebook again")
        return cls(folder, cb, read_codebook(folder, manifest), int(manifest["count"]), _locations(manifest))

    def write(self, maps: np.ndarray) -> np.ndarray:
        """Encode and append maps ``[n, d, h, w]``; returns their codes."""
        codes, err = encode_maps(maps, self.centroids)
        data = codes.tobytes()
        self._fh.write(data)
        self._hash.update(data)
        self.count += codes.shape[0]
        self.error += err
        return codes

    def finish(self) -> Dict[str, Any]:
        """Flush the codes to disk; the codebook entry that commits them."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        out = dict(self.entry)
        if self.count:
            out["segments"] = list(self.entry["segments"]) + [
                {"start": self.start, "count": self.count, "sha256": self._hash.hexdigest(), "error": self.error,
                 "added": now()}]
        return out

    def abort(self) -> None:
        """Cut the codes file back to the committed size (best effort)."""
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            os.truncate(self.path, self.size)


def iter_codes(folder: str, manifest: Dict[str, Any], chunk: int = 1 << 16) -> Iterator[np.ndarray]:
    """The committed codes in consecutive chunks ``[n, h * w]`` (uint16), read from the file."""
    cb = manifest["codebook"]
    covered, L = codes_coverage(manifest), _locations(manifest)
    row = L * CODES_DTYPE.itemsize
    with open(os.path.join(folder, cb["codes_file"]), "rb") as fh:
        for s in range(0, covered, chunk):
            n = min(chunk, covered - s)
            buf = np.empty((n, L), dtype=CODES_DTYPE)
            got = os.preadv(fh.fileno(), [memoryview(buf).cast("B")], s * row)
            if got != buf.nbytes:
                raise GalleryIndexError(f"{folder}: {cb['codes_file']} ends early at map {s}; the index is damaged")
            yield buf


def train_codes(folder: str, manifest: Dict[str, Any], read_maps: Callable[[np.ndarray], np.ndarray],
                maps: Iterable[np.ndarray], k: Optional[int] = None, *, sample: Optional[int] = None,
                iterations: int = 10, seed: int = 0) -> Dict[str, Any]:
    """Train a codebook on the committed maps of the index at ``folder`` and encode them all.

    ``k`` centroids (default :func:`~qaconv_ext.search.centroids.default_codebook_size`) by spherical k-means
    over ``sample`` location vectors (default :func:`~qaconv_ext.search.centroids.default_sample_size`) of
    maps drawn with ``seed`` (``read_maps(sorted indices)`` reads them); ``maps`` yields every committed map
    in order, in chunks, for the codes. Writes the files (flushed) and returns the manifest's codebook entry;
    committing it is the caller's. On failure the new files are removed.
    """
    count, L = int(manifest["count"]), _locations(manifest)
    if count == 0:
        raise GalleryIndexError(f"{folder}: no maps to train a codebook on")
    k = default_codebook_size(count * L) if k is None else int(k)
    sample = default_sample_size(k) if sample is None else int(sample)
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(count, generator=gen)[:min(count, max(1, math.ceil(sample / L)))]
    vectors = location_vectors(read_maps(torch.sort(pick).values.numpy()))
    if vectors.shape[0] > sample:
        vectors = vectors[torch.sort(torch.randperm(vectors.shape[0], generator=gen)[:sample]).values]
    if k > vectors.shape[0]:
        raise GalleryIndexError(f"{folder}: a codebook of {k} centroids needs at least {k} location vectors, the "
                                f"sample holds {vectors.shape[0]}")
    centroids, error = spherical_kmeans(vectors, k, iterations=iterations, seed=seed)
    entry = write_codebook(folder, centroids, {"seed": int(seed), "iterations": int(iterations),
                                               "sample": int(vectors.shape[0]), "train_error": error,
                                               "trained_on": count})
    writer = CodesWriter(folder, entry, centroids, 0, L)
    try:
        for chunk in maps:
            writer.write(chunk)
        return writer.finish()
    except BaseException:
        writer.abort()
        remove_codebook_files(folder, entry)
        raise
