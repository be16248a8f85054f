"""From images to feature maps for an index: the trained model behind it, records, and batched extraction."""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..data import Record
from ..engine import CheckpointError, load_trained
from ..scoring import extract_features
from .storage import GalleryIndexError

__all__ = ["as_record", "as_records", "load_model", "map_shape_of", "extract_map_blocks"]

RecordLike = Union[Record, Dict[str, Any], str, "os.PathLike[str]", Any]


def as_record(item: RecordLike) -> Record:
    """A :class:`~qaconv_ext.data.Record` from a record, a mapping with ``path``/``pid``/``camid``
    (or ``camera``)/``time``, an object with those attributes, or an image path (identity and camera
    unknown: -1)."""
    if isinstance(item, Record):
        return item
    if item is None:
        return Record(None, -1, -1, None)  # type: ignore[arg-type]
    if isinstance(item, (str, os.PathLike)):
        return Record(os.fspath(item), -1, -1, None)
    if isinstance(item, dict):
        get = item.get
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(item, key, default)
    path = get("path")
    pid, camid, t = get("pid"), get("camid", get("camera")), get("time")
    return Record(None if path is None else os.fspath(path), -1 if pid is None else int(pid),
                  -1 if camid is None else int(camid), None if t is None else float(t))


def as_records(items: Optional[Sequence[RecordLike]], n: int, what: str = "records") -> List[Record]:
    """``n`` records (``None``: ``n`` unknown ones), checked for their number."""
    if items is None:
        return [Record(None, -1, -1, None)] * n  # type: ignore[list-item]
    out = [as_record(r) for r in items]
    if len(out) != n:
        raise GalleryIndexError(f"{what}: {len(out)} records for {n} maps")
    return out


def load_model(checkpoint: str, device: Union[str, torch.device] = "cpu"
               ) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """``(backbone, head, config)`` of a trained QAConv checkpoint (:func:`qaconv_ext.engine.load_trained`),
    in eval mode; a baseline checkpoint or an unreadable file is a :class:`GalleryIndexError`."""
    try:
        backbone, head, cfg = load_trained(checkpoint, device=device)
    except (CheckpointError, FileNotFoundError) as exc:
        raise GalleryIndexError(str(exc)) from None
    if head is None:
        raise GalleryIndexError(f"{checkpoint} is a baseline checkpoint (no QAConv head); an index needs a "
                                "QAConv model")
    return backbone, head, cfg


def map_shape_of(head: nn.Module, cfg: Dict[str, Any]) -> Tuple[int, int, int]:
    """``(d, h, w)`` of the maps a loaded model produces."""
    return int(head.num_features), int(cfg["feature_height"]), int(cfg["feature_width"])


def extract_map_blocks(backbone: nn.Module, records: Sequence[Record], height: int, width: int, *,
                       preprocess: str, batch_size: int = 64, device: Union[str, torch.device] = "cpu", workers: int = 0,
                       block: Optional[int] = None, progress: bool = True, desc: str = "index images"
                       ) -> Iterator[Tuple[torch.Tensor, List[Record]]]:
    """Feature maps of ``records`` in blocks of ``block`` images (default 16 batches):
    ``(maps [n, d, h, w] float32 CPU, records)`` per block, with a progress bar over the images.

    Uses :func:`qaconv_ext.scoring.extract_features` (the test transform of the input preset
    ``preprocess``, batches of ``batch_size``).
    An image that cannot be read raises :class:`~qaconv_ext.data.ImageReadError` naming it.
    """
    from tqdm.auto import tqdm

    records = list(records)
    block = int(block or 16 * batch_size)
    bar = tqdm(total=len(records), desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    try:
        for s in range(0, len(records), block):
            part = records[s:s + block]
            maps = extract_features(backbone, part, height, width, batch_size=batch_size, device=device,
                                    workers=workers, progress=False, preprocess=preprocess)
            bar.update(len(part))
            yield maps, part
    finally:
        bar.close()
