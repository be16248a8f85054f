"""Image records, image reading and the map-style dataset that feeds a DataLoader."""
from __future__ import annotations

import os
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

__all__ = ["Record", "ImageReadError", "read_image", "ImageDataset"]


class Record(NamedTuple):
    """One image of a re-id set.

    ``pid`` is the identity (relabelled to ``0..C-1`` in training sets, the original number in
    query/gallery sets, where ``0`` marks distractors), ``camid`` the 0-based camera and ``time``
    the capture time in seconds (``None`` when the set has no time stamps).
    """

    path: str
    pid: int
    camid: int
    time: Optional[float] = None


class ImageReadError(OSError):
    """An image file that is missing or cannot be decoded (the message names the path)."""


def read_image(path: str) -> "PIL.Image.Image":  # noqa: F821 - PIL is imported lazily
    """Read an image file as an RGB ``PIL.Image``.

    Raises :class:`ImageReadError` (an ``OSError``) naming ``path`` when the file is missing or
    cannot be decoded (truncated, not an image, ...).
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc


class ImageDataset(Dataset):
    """Map-style dataset over :class:`Record` s (plain image paths are accepted too: pid and camid -1).

    Item ``i`` is ``(image, pid, camid, i)`` where ``image`` is ``transform(read_image(path))``
    (the PIL image itself when ``transform`` is ``None``).
    """

    def __init__(self, records: Sequence[Union[Record, str, "os.PathLike[str]"]],
                 transform: Optional[Callable] = None) -> None:
        self.records: List[Record] = [Record(os.fspath(r), -1, -1) if isinstance(r, (str, os.PathLike)) else r
                                      for r in records]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int, int]:
        rec = self.records[index]
        img = read_image(rec.path)
        if self.transform is not None:
            img = self.transform(img)
        return img, rec.pid, rec.camid, index

    @property
    def pids(self) -> List[int]:
        """Identity of every item, in order."""
        return [r.pid for r in self.records]

    @property
    def camids(self) -> List[int]:
        """Camera of every item, in order."""
        return [r.camid for r in self.records]

    @property
    def times(self) -> List[Optional[float]]:
        """Time stamp (seconds or ``None``) of every item, in order."""
        return [r.time for r in self.records]
