"""``GalleryIndex``: a gallery of QAConv feature maps on disk, searched by streaming it through the fused op.

    index = GalleryIndex.build("archive.idx", "runs/demo/qaconv.pt", records)    # from images
    index = GalleryIndex.create("maps.idx", head, maps, records)                  # from feature maps
    index = GalleryIndex.open("archive.idx", checkpoint="runs/demo/qaconv.pt")
    index.append_images(new_records)                                             # or index.append(maps, records)
    scores, indices = index.search(query_maps, k=10)                             # exact, streaming
    scores, indices = index.search(query_maps, k=10, shortlist=500)              # two-stage, approximate
    index.train_codebook(4096)                       # or build/create(..., codebook=4096): centroid codes
    scores, indices = index.search(query_maps, k=10, shortlist=500, method="centroid")

The folder layout and the rules that keep it valid under interruptions are described in
:mod:`qaconv_ext.search.storage`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data import Record
from .identity import (
    HeadLike,
    check_checkpoint,
    check_head,
    describe_model,
    model_identity,
    check_preprocessing,
)
from .centroids import centroid_topk
from .codes import (
    CodesWriter,
    check_codes,
    codebook_bytes,
    codebook_drift,
    codes_coverage,
    iter_codes,
    read_codebook,
    remove_codebook_files,
    train_codes,
    verify_codes,
)
from .images import RecordLike, as_records, extract_map_blocks, load_model, map_shape_of
from .storage import (
    DESCRIPTORS_DTYPE,
    DESCRIPTORS_FILE,
    FORMAT,
    MANIFEST,
    MAPS_DTYPE,
    MAPS_FILE,
    RECORDS_FILE,
    GalleryIndexError,
    SegmentWriter,
    check_sizes,
    committed_bytes,
    locked,
    map_nbytes,
    now,
    read_manifest,
    read_records,
    record_line,
    verify_segments,
    write_manifest,
)
from ..scoring import blocks as iterate_blocks
from .topk import descriptor_topk, global_descriptors, rerank_shortlist, streaming_topk

__all__ = ["GalleryIndex", "NonFiniteScoresError", "DEFAULT_CHUNK_BYTES", "METHODS"]

#: Float32 bytes of the gallery maps scored per call of the fused op while streaming (64 MiB).
DEFAULT_CHUNK_BYTES = 64 << 20
#: The search methods: exact, and the two two-stage ones (which shortlist by what).
METHODS = ("exhaustive", "descriptor", "centroid")

MapsLike = Union[torch.Tensor, np.ndarray]
Block = Tuple[MapsLike, Optional[Sequence[RecordLike]]]


class NonFiniteScoresError(GalleryIndexError):
    """A search met scores that are not finite (NaN or Inf): maps of the index hold such values (the
    index is damaged) or the queries' maps do. Nothing is returned rather than a ranking with them."""


def _first_non_finite(maps: np.ndarray) -> Optional[int]:
    """The position of the first map ``[n, ...]`` holding a NaN or Inf, else None."""
    ok = np.isfinite(maps).reshape(maps.shape[0], -1).all(axis=1)
    return None if ok.all() else int(np.flatnonzero(~ok)[0])


def _as_maps(maps: MapsLike, what: str) -> np.ndarray:
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().to("cpu")
        maps = maps.float().numpy() if maps.dtype == torch.bfloat16 else maps.numpy()
    arr = np.asarray(maps)
    if arr.dtype.kind != "f":
        raise GalleryIndexError(f"{what}: expected floating-point feature maps, got dtype {arr.dtype}")
    if arr.ndim != 4:
        raise GalleryIndexError(f"{what}: expected feature maps [n, d, h, w], got shape {list(arr.shape)}")
    return arr


class GalleryIndex:
    """A gallery of feature maps on disk (see the module doc). Use :meth:`create`, :meth:`build` or
    :meth:`open`; ``len(index)`` is the number of committed maps, ``index.records[i]`` the
    :class:`~qaconv_ext.data.Record` of map ``i`` (path, pid, camid, time; -1/None when unknown)."""

    def __init__(self, path: str, manifest: Dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._records: Optional[List[Record]] = None
        self._centroids: Optional[Tuple[str, torch.Tensor]] = None  # (codebook sha256, centroids) once read

    @property
    def records(self) -> List[Record]:
        """The record of every map (read and checked against the checksums on first use)."""
        if self._records is None:
            self._records = [Record(p, -1 if pid is None else pid, -1 if cam is None else cam, t)
                             for p, pid, cam, t in read_records(self.path, self.manifest)]
        return self._records

    # ------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return (f"GalleryIndex({self.path!r}, {len(self)} maps of {'x'.join(map(str, self.map_shape))}, "
                f"model: {describe_model(self.model)})")

    @property
    def map_shape(self) -> Tuple[int, int, int]:
        """``(d, h, w)`` of every map."""
        d, h, w = self.manifest["map_shape"]
        return int(d), int(h), int(w)

    @property
    def model(self) -> Dict[str, Any]:
        """The identity of the model that made the maps (checkpoint, preprocessing, folded head)."""
        return self.manifest["model"]

    def disk_usage(self) -> Tuple[int, int]:
        """``(committed, leftover)`` bytes: the manifest and the committed part of each data file, and
        what lies behind the committed end (left by an interrupted append; the next append cuts it off)."""
        committed = os.path.getsize(os.path.join(self.path, MANIFEST))
        leftover = 0
        for name, nbytes in {**committed_bytes(self.manifest), **codebook_bytes(self.manifest)}.items():
            f = os.path.join(self.path, name)
            have = os.path.getsize(f) if os.path.isfile(f) else 0
            committed += min(have, nbytes)
            leftover += max(0, have - nbytes)
        return committed, leftover

    def folded_head(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The index's folded head ``(weight [2L], bias [])`` as float32 tensors."""
        head = self.model["head"]
        return torch.tensor(head["weight"], dtype=torch.float32), torch.tensor(head["bias"], dtype=torch.float32)

    # ------------------------------------------------------------------------------------------
    # making and opening
    # ------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str, head: HeadLike, maps: MapsLike, records: Optional[Sequence[RecordLike]] = None, *,
               checkpoint: Optional[str] = None, config: Optional[Dict[str, Any]] = None,
               overwrite: bool = False, codebook: Optional[int] = None) -> "GalleryIndex":
        """A new index at ``path`` from feature maps ``[N, d, h, w]`` (stored as float16) and the QAConv
        ``head`` that scores them (a module with ``folded()`` or a ``(weight, bias)`` pair).

        ``records``: one per map (records, mappings, paths; default: unknown). ``checkpoint``/``config``
        record where the maps came from. The index is written to a temporary folder beside ``path`` and
        renamed into place, so an interrupted create leaves nothing (or, with ``overwrite``, the old
        index) behind. (Replacing takes two renames: a crash between them leaves the old index in a
        hidden ``.<name>.*.old`` folder beside ``path``.) ``codebook=K`` also trains a codebook of ``K``
        centroids and stores every map's centroid codes (see :meth:`train_codebook`; 0: the default size).
        """
        arr = _as_maps(maps, "maps")
        ident = model_identity(head, arr.shape[1:], checkpoint=checkpoint, config=config)
        return cls._write_new(path, ident, [(arr, records)], overwrite, codebook)

    @classmethod
    def build(cls, path: str, checkpoint: str, records: Sequence[RecordLike], *, batch_size: int = 64,
              device: Union[str, torch.device] = "cpu", workers: int = 0, progress: bool = True,
              block: Optional[int] = None, overwrite: bool = False, codebook: Optional[int] = None
              ) -> "GalleryIndex":
        """A new index at ``path`` from the images of ``records`` (records or paths) with the trained
        QAConv model in ``checkpoint`` (:func:`qaconv_ext.engine.load_trained`): features are extracted
        in batches (progress bar) and written block by block; committed once at the end (see
        :meth:`create` for what an interruption leaves, and ``codebook``)."""
        recs = as_records(records, len(records))
        if not recs:
            raise GalleryIndexError(f"{path}: no images to index")
        backbone, head, cfg = load_model(checkpoint, device)
        ident = model_identity(head, map_shape_of(head, cfg), checkpoint=cfg["checkpoint"], config=cfg)
        blocks = extract_map_blocks(backbone, recs, int(cfg["height"]), int(cfg["width"]), preprocess=cfg["preprocess"],
                                    batch_size=batch_size,
                                    device=device, workers=workers, block=block, progress=progress)
        return cls._write_new(path, ident, blocks, overwrite, codebook)

    @classmethod
    def open(cls, path: str, *, head: Optional[HeadLike] = None, checkpoint: Optional[str] = None,
             verify: bool = False) -> "GalleryIndex":
        """Open the index at ``path``.

        Checks the manifest and that every data file holds the committed bytes; with ``verify`` also
        every checksum (reads all maps, descriptors and records). The records are read, and checked
        against their checksums, when :attr:`records` is first used. With ``head`` or ``checkpoint``,
        checks that the index was made by that model (else the error names the model it was made with).
        Raises :class:`GalleryIndexError`.
        """
        path = os.path.abspath(os.fspath(path))
        manifest = read_manifest(path)
        check_sizes(path, manifest)
        check_codes(path, manifest)
        index = cls(path, manifest)
        if verify:
            verify_segments(path, manifest)
            verify_codes(path, manifest)
            index.records  # noqa: B018 - reads and checks them
        if checkpoint is not None:
            check_checkpoint(path, index.model, os.fspath(checkpoint))
            if not index.model.get("checkpoint"):
                _, ck_head, ck_cfg = load_model(os.fspath(checkpoint))
                check_head(path, index.model, ck_head)
                check_preprocessing(path, index.model, ck_cfg, os.fspath(checkpoint))
        if head is not None:
            check_head(path, index.model, head)
        return index

    def refresh(self) -> "GalleryIndex":
        """Re-read the manifest and records (e.g. after another process appended); returns ``self``."""
        fresh = GalleryIndex.open(self.path)
        self.manifest, self._records = fresh.manifest, None
        return self

    def verify(self) -> None:
        """Recompute every checksum of the committed data (maps, descriptors, records)."""
        verify_segments(self.path, self.manifest, (MAPS_FILE, DESCRIPTORS_FILE, RECORDS_FILE))
        verify_codes(self.path, self.manifest)

    @classmethod
    def _write_new(cls, path: str, ident: Dict[str, Any], blocks: Iterable[Block], overwrite: bool,
                   codebook: Optional[int] = None) -> "GalleryIndex":
        path = os.path.abspath(os.fspath(path))
        if os.path.exists(path) and not overwrite:
            raise GalleryIndexError(f"{path} already exists (pass overwrite=True to replace it)")
        if os.path.exists(path) and not os.path.isfile(os.path.join(path, "manifest.json")):
            raise GalleryIndexError(f"{path} exists and is not a gallery index; not replacing it")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
        try:
            manifest = {"format": FORMAT, "count": 0, "map_shape": ident["map_shape"], "records_bytes": 0,
                        "segments": [], "model": ident, "created": now(), "updated": now()}
            manifest = _write_segment(tmp, manifest, blocks, name=path)
            if codebook is not None:
                fresh = cls(tmp, manifest)
                manifest = dict(manifest, codebook=train_codes(tmp, manifest, fresh.read_maps, fresh.iter_maps(),
                                                               int(codebook) or None))
            write_manifest(tmp, manifest)
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=parent)
                os.replace(path, os.path.join(old, "index"))
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path)

    # ------------------------------------------------------------------------------------------
    # appending
    # ------------------------------------------------------------------------------------------
    def append(self, maps: MapsLike, records: Optional[Sequence[RecordLike]] = None) -> "GalleryIndex":
        """Add feature maps ``[n, d, h, w]`` (and their records) at the end, without rewriting the stored
        maps; committed at once by replacing the manifest, so an interrupted append leaves the index as
        it was. Returns ``self`` (with the new maps)."""
        return self._append_blocks([(_as_maps(maps, f"{self.path}: append"), records)])

    def append_images(self, records: Sequence[RecordLike], *, checkpoint: Optional[str] = None,
                      batch_size: int = 64, device: Union[str, torch.device] = "cpu", workers: int = 0,
                      progress: bool = True, block: Optional[int] = None) -> "GalleryIndex":
        """Add the images of ``records`` with the index's model (``checkpoint``: default the one recorded;
        it must be the same model). One commit at the end, as in :meth:`append`."""
        recs = as_records(records, len(records))
        if not recs:
            return self
        backbone, _, cfg = self.load_model(checkpoint, device)
        blocks = extract_map_blocks(backbone, recs, int(cfg["height"]), int(cfg["width"]), preprocess=cfg["preprocess"],
                                    batch_size=batch_size,
                                    device=device, workers=workers, block=block, progress=progress)
        return self._append_blocks(blocks)

    def train_codebook(self, k: Optional[int] = None, *, sample: Optional[int] = None, iterations: int = 10,
                       seed: int = 0) -> "GalleryIndex":
        """Train a codebook of ``k`` centroids on the committed maps and store every map's centroid codes
        (replacing a codebook the index has), for ``search(..., method="centroid")``.

        Spherical k-means (:func:`~qaconv_ext.search.centroids.spherical_kmeans`, seeded) over ``sample``
        location vectors of maps drawn with ``seed``; defaults: ``k`` the power of two nearest ``4 sqrt(n)``
        for ``n`` location vectors (2^8..2^12, at most n), 32 vectors per centroid. Committed at once by
        replacing the manifest (the old codebook's files are deleted after). Appends encode new maps with this codebook;
        :meth:`codebook_drift` says when training again is worthwhile. Returns ``self``.
        """
        with locked(self.path):
            manifest = read_manifest(self.path)
            check_sizes(self.path, manifest)
            current = GalleryIndex(self.path, manifest)
            entry = train_codes(self.path, manifest, current.read_maps, current.iter_maps(), k, sample=sample,
                                iterations=iterations, seed=seed)
            try:
                write_manifest(self.path, dict(manifest, codebook=entry, updated=now()))
            except BaseException:
                remove_codebook_files(self.path, entry)
                raise
            remove_codebook_files(self.path, manifest.get("codebook"))
        return self.refresh()

    @property
    def has_codebook(self) -> bool:
        """Whether the index holds a centroid codebook and codes."""
        return "codebook" in self.manifest

    def centroids(self) -> torch.Tensor:
        """The codebook's centroids ``[K, d]`` (float32, checked against their checksum when first read)."""
        self._require_codebook()
        sha = self.manifest["codebook"]["codebook_sha256"]
        if self._centroids is None or self._centroids[0] != sha:
            self._centroids = (sha, read_codebook(self.path, self.manifest))
        return self._centroids[1]

    def iter_codes(self, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
        """Every map's centroid codes in consecutive uint16 chunks ``[n, h * w]``, read from the file."""
        self._require_codebook()
        return iter_codes(self.path, self.manifest, chunk)

    def codebook_drift(self) -> Optional[Dict[str, Any]]:
        """The quantisation error of the maps appended since the codebook was trained against the training
        sample's, and whether a retrain is worthwhile (:func:`~qaconv_ext.search.codes.codebook_drift`);
        ``None`` without a codebook."""
        return codebook_drift(self.manifest)

    def _require_codebook(self) -> None:
        if not self.has_codebook:
            raise GalleryIndexError(f"{self.path} has no centroid codebook (train one with "
                                    "index.train_codebook(K) or `qaconv index build --codebook K`)")
        if codes_coverage(self.manifest) != len(self):
            raise GalleryIndexError(f"{self.path}: the codes cover {codes_coverage(self.manifest)} of {len(self)} "
                                    "maps; train the codebook again")

    def _append_blocks(self, blocks: Iterable[Block]) -> "GalleryIndex":
        with locked(self.path):
            manifest = read_manifest(self.path)
            if manifest["model"] != self.model:
                raise GalleryIndexError(f"{self.path} was replaced by an index of another model")
            check_sizes(self.path, manifest)
            manifest = _write_segment(self.path, manifest, blocks)
            write_manifest(self.path, manifest)
        return self.refresh()

    # ------------------------------------------------------------------------------------------
    # the model
    # ------------------------------------------------------------------------------------------
    def load_model(self, checkpoint: Optional[str] = None, device: Union[str, torch.device] = "cpu"
                   ) -> Tuple[torch.nn.Module, torch.nn.Module, Dict[str, Any]]:
        """``(backbone, head, config)`` of the index's model, from ``checkpoint`` or the one recorded in the
        index, after checking it is that model (checkpoint hash, folded head, input preprocessing)."""
        recorded = self.model.get("checkpoint")
        if checkpoint is None:
            if not recorded:
                raise GalleryIndexError(f"{self.path} was made from feature maps without a checkpoint; give the "
                                        "checkpoint of its model")
            checkpoint = recorded["path"]
            if not os.path.isfile(checkpoint):
                raise GalleryIndexError(f"the checkpoint {checkpoint} that made {self.path} is missing; give its "
                                        "new location")
        checkpoint = os.fspath(checkpoint)
        check_checkpoint(self.path, self.model, checkpoint)
        backbone, head, cfg = load_model(checkpoint, device)
        check_head(self.path, self.model, head)
        if list(map_shape_of(head, cfg)) != list(self.map_shape):
            raise GalleryIndexError(f"{checkpoint} makes {list(map_shape_of(head, cfg))} maps, {self.path} holds "
                                    f"{list(self.map_shape)}")
        check_preprocessing(self.path, self.model, cfg, checkpoint)
        return backbone, head, cfg

    # ------------------------------------------------------------------------------------------
    # reading
    # ------------------------------------------------------------------------------------------
    def maps(self) -> np.ndarray:
        """All committed maps as a read-only float16 ``np.memmap`` ``[N, d, h, w]``."""
        if len(self) == 0:
            return np.empty((0, *self.map_shape), dtype=MAPS_DTYPE)
        return np.memmap(os.path.join(self.path, MAPS_FILE), dtype=MAPS_DTYPE, mode="r",
                         shape=(len(self), *self.map_shape))

    def descriptors(self) -> np.ndarray:
        """The global descriptors (average-pooled, L2-normalised maps) as a read-only float32 memmap ``[N, d]``."""
        if len(self) == 0:
            return np.empty((0, self.map_shape[0]), dtype=DESCRIPTORS_DTYPE)
        return np.memmap(os.path.join(self.path, DESCRIPTORS_FILE), dtype=DESCRIPTORS_DTYPE, mode="r",
                         shape=(len(self), self.map_shape[0]))

    def chunk_size(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
        """Maps per streamed chunk: ``chunk_bytes`` of float32 maps."""
        return max(1, int(chunk_bytes) // (4 * int(np.prod(self.map_shape))))

    def iter_maps(self, chunk: Optional[int] = None, start: int = 0, stop: Optional[int] = None
                  ) -> Iterator[np.ndarray]:
        """The maps ``start..stop`` in consecutive float16 chunks ``[n, d, h, w]`` read from the file (not
        mapped, so memory stays one or two chunks; the next chunk is read while the caller works)."""
        return self._iter_rows(MAPS_FILE, MAPS_DTYPE, self.map_shape, chunk or self.chunk_size(), start, stop)

    def iter_descriptors(self, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
        """The descriptors in consecutive float32 chunks ``[n, d]``."""
        return self._iter_rows(DESCRIPTORS_FILE, DESCRIPTORS_DTYPE, (self.map_shape[0],), chunk, 0, None)

    def _iter_rows(self, name: str, dtype: np.dtype, shape: Tuple[int, ...], chunk: int, start: int,
                   stop: Optional[int]) -> Iterator[np.ndarray]:
        stop = len(self) if stop is None else min(int(stop), len(self))
        row = int(np.prod(shape)) * dtype.itemsize
        path = os.path.join(self.path, name)

        def read(fh: Any, a: int, b: int) -> np.ndarray:
            buf = np.empty((b - a, *shape), dtype=dtype)
            got = os.preadv(fh.fileno(), [memoryview(buf).cast("B")], a * row) if buf.size else 0
            if got != buf.nbytes:
                raise GalleryIndexError(f"{self.path}: {name} ends early (read {got} of {buf.nbytes} bytes at "
                                        f"map {a}); the index is damaged")
            return buf

        blocks = iterate_blocks(stop - start, chunk)
        if not blocks:
            return
        with open(path, "rb") as fh, ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, fh, start + blocks[0][0], start + blocks[0][1])
            for i in range(len(blocks)):
                buf = pending.result()
                if i + 1 < len(blocks):
                    pending = pool.submit(read, fh, start + blocks[i + 1][0], start + blocks[i + 1][1])
                yield buf

    def read_maps(self, indices: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """The maps at ``indices`` (float16 ``[n, d, h, w]``, in the order given), read from the file."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"map index out of range for {len(self)} maps")
        out = np.empty((idx.size, *self.map_shape), dtype=MAPS_DTYPE)
        row = map_nbytes(self.map_shape)
        with open(os.path.join(self.path, MAPS_FILE), "rb") as fh:
            order = np.argsort(idx, kind="stable")
            s = 0
            while s < order.size:  # runs of consecutive indices are read at once
                e = s + 1
                while e < order.size and idx[order[e]] == idx[order[e - 1]] + 1:
                    e += 1
                first = int(idx[order[s]])
                buf = np.empty((e - s, *self.map_shape), dtype=MAPS_DTYPE)
                got = os.preadv(fh.fileno(), [memoryview(buf).cast("B")], first * row)
                if got != buf.nbytes:
                    raise GalleryIndexError(f"{self.path}: {MAPS_FILE} ends early at map {first}; the index is "
                                            "damaged")
                out[order[s:e]] = buf
                s = e
        return out

    # ------------------------------------------------------------------------------------------
    # searching
    # ------------------------------------------------------------------------------------------
    def _queries(self, query_maps: MapsLike) -> torch.Tensor:
        q = query_maps if isinstance(query_maps, torch.Tensor) else torch.from_numpy(np.asarray(query_maps))
        if q.dim() == 3:
            q = q[None]
        if q.dim() != 4 or tuple(q.shape[1:]) != self.map_shape:
            raise GalleryIndexError(f"query maps are {list(q.shape)}, {self.path} holds "
                                    f"{list(self.map_shape)} maps")
        if not q.is_floating_point():
            raise GalleryIndexError(f"query maps: expected floating-point maps, got {q.dtype}")
        if q.numel() and not bool(torch.isfinite(q).all()):
            bad = int((~torch.isfinite(q)).flatten(1).any(dim=1).nonzero()[0])
            raise NonFiniteScoresError(f"query map {bad} holds NaN or infinite values, so its scores against "
                                       f"{self.path} are not finite")
        return q

    def _non_finite(self, indices: torch.Tensor, bad: torch.Tensor) -> NonFiniteScoresError:
        """The error for results ``indices [P, k]`` whose scores are not finite where ``bad``: a stored map
        that is not finite (a damaged index), else scores that overflow."""
        p, j = (int(x) for x in bad.nonzero()[0])
        i = int(indices[p, j])
        if _first_non_finite(self.read_maps([i])) is not None:
            return NonFiniteScoresError(f"{self.path}: map {i} holds NaN or infinite values, so its scores are not "
                                        f"finite; the index is damaged: check it with `qaconv index info --verify "
                                        f"{self.path}`")
        return NonFiniteScoresError(f"the scores of query {p} against {self.path} are not finite (map {i}: they "
                                    "overflow float32); nothing is ranked")

    def search(self, query_maps: MapsLike, k: int = 10, *, shortlist: Optional[int] = None,
               method: Optional[str] = None, chunk: Optional[int] = None, device: Union[str, torch.device, None] = None,
               compute_dtype: Optional[torch.dtype] = None, progress: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best gallery maps of every query map ``[P, d, h, w]`` (or one ``[d, h, w]``).

        Exhaustive by default: the gallery is streamed in chunks of ``chunk`` maps (default 64 MiB of
        float32) through :func:`qaconv_ext.qaconv_score` with the index's folded head, keeping a running
        top ``k`` (:func:`~qaconv_ext.search.streaming_topk`): exact, memory ``O(P * k + chunk)``.

        ``shortlist=M`` (``k <= M``): two-stage and approximate: the global descriptors (average-pooled,
        L2-normalised maps) shortlist ``M`` candidates per query by cosine similarity, then the exact
        QAConv score ranks them. Equal to the exhaustive result whenever the shortlist contains the
        exhaustive top ``k``; ``M >= len(index)`` is the exhaustive search.

        ``method``: ``"exhaustive"``, ``"descriptor"`` (the shortlist just described, the default with
        ``shortlist``) or ``"centroid"``: the shortlist by the centroid score of every map's stored codes
        (:func:`~qaconv_ext.search.centroids.centroid_topk`: QAConv's score with each gallery location
        replaced by its centroid; needs a codebook, see :meth:`train_codebook`), then the exact score.

        Returns ``(scores [P, k] float32, indices [P, k] int64)`` on the CPU, by score descending, ties
        by the smaller index; ``[0, k]`` for no queries. Scores are always finite: a map that is not
        (a damaged index) or queries that are not end the search with :class:`NonFiniteScoresError`.
        """
        q = self._queries(query_maps)
        n = len(self)
        if int(k) < 1:
            raise GalleryIndexError(f"k must be at least 1, got {k}")
        if int(k) > n:
            raise GalleryIndexError(f"k={k} is larger than the gallery: {self.path} holds {n} maps")
        k = int(k)
        weight, bias = self.folded_head()
        if shortlist is not None and int(shortlist) < k:
            raise GalleryIndexError(f"shortlist={shortlist} must be at least k={k}")
        method = _method(method, shortlist)
        if method == "centroid":
            self._require_codebook()
        if q.shape[0] == 0:
            return torch.empty(0, k, dtype=torch.float32), torch.empty(0, k, dtype=torch.int64)
        if method == "exhaustive" or int(shortlist) >= n:
            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=n, desc="search", unit="map", leave=False, dynamic_ncols=True)
            try:
                scores, indices = streaming_topk(q, self.iter_maps(chunk), weight, bias, k, device=device,
                                                 compute_dtype=compute_dtype, progress=bar.update if bar else None)
            finally:
                if bar is not None:
                    bar.close()
        else:
            if method == "centroid":
                _, cand = centroid_topk(q, self.iter_codes(), self.centroids(), weight, bias, int(shortlist))
            else:
                _, cand = descriptor_topk(global_descriptors(q), self.iter_descriptors(), int(shortlist))
            scores, indices = rerank_shortlist(q, cand, self.read_maps, weight, bias, k, device=device,
                                               compute_dtype=compute_dtype)
        # NaN and +Inf scores rank first, so a scored map with a non-finite score is among the results
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            raise self._non_finite(indices, bad)
        return scores, indices


def _method(method: Optional[str], shortlist: Optional[int]) -> str:
    """The search method asked for (default: exhaustive, or descriptor with a shortlist), checked."""
    if method is None:
        return "exhaustive" if shortlist is None else "descriptor"
    if method not in METHODS:
        raise GalleryIndexError(f"unknown search method {method!r}; use one of {', '.join(METHODS)}")
    if method != "exhaustive" and shortlist is None:
        raise GalleryIndexError(f"method={method!r} is a two-stage search: give the shortlist size")
    return method


def _write_segment(folder: str, manifest: Dict[str, Any], blocks: Iterable[Block], name: Optional[str] = None
                   ) -> Dict[str, Any]:
    """Write ``blocks`` after the committed end of the index at ``folder``; returns the manifest that
    commits them (not yet written). On any failure the files are cut back and the error re-raised.
    ``name``: the index's path in the error messages (default ``folder``; a new index is written in a
    temporary folder, which means nothing to the user)."""
    name = name or folder
    shape = tuple(int(x) for x in manifest["map_shape"])
    writer = SegmentWriter(folder, manifest)
    try:
        codes = CodesWriter.for_index(folder, manifest)
    except BaseException:
        writer.abort()
        raise
    try:
        for maps, records in blocks:
            arr = _as_maps(maps, f"{name}: maps")
            if tuple(arr.shape[1:]) != shape:
                raise GalleryIndexError(f"{name}: the maps to add are {list(arr.shape)}, the index holds "
                                        f"[n, {', '.join(map(str, shape))}] maps")
            with np.errstate(over="ignore"):
                half = arr.astype(MAPS_DTYPE)
            if not np.isfinite(half).all():
                raise GalleryIndexError(f"{name}: the maps to add hold NaN or infinite values (or values "
                                        "beyond float16's range)")
            recs = as_records(records, half.shape[0], f"{name}: records")
            desc = global_descriptors(torch.from_numpy(half)).numpy()
            lines = b"".join(record_line(r.path, r.pid, r.camid, r.time) for r in recs)
            writer.write(half, desc, lines)
            if codes is not None:
                codes.write(half)
        segment = writer.finish()
        codebook = codes.finish() if codes is not None else None
    except BaseException:
        writer.abort()
        if codes is not None:
            codes.abort()
        raise
    out = dict(manifest)
    if segment["count"]:
        out.update(count=int(manifest["count"]) + segment["count"],
                   records_bytes=int(manifest["records_bytes"]) + segment["records_bytes"],
                   segments=list(manifest["segments"]) + [segment], updated=now())
        if codebook is not None:
            out["codebook"] = codebook
    return out
