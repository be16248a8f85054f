"""Reading PyTorch files safely (``torch.load(weights_only=True)``) with one-line errors naming the file.

Shared by the checkpoint loader of training/evaluation and the reader of pretrained backbone weights.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

__all__ = ["TorchFileError", "looks_like_torch_file", "load_torch_file"]


class TorchFileError(RuntimeError):
    """A file that is not a PyTorch file or cannot be read safely (the message names the path)."""


def looks_like_torch_file(path: str) -> bool:
    """Starts like a zip archive (``torch.save`` since PyTorch 1.6, also when damaged) or a pickle
    stream of protocol 2+ (the legacy format)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _reason(exc: BaseException) -> str:
    """The informative line of a ``torch.load`` error (not its advice to load with ``weights_only=False``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln[len("WeightsUnpickler error:"):].strip().split(". ")[0]
    return lines[0].split(". ")[0] if lines else type(exc).__name__


def load_torch_file(path: str, map_location: Any = "cpu", mmap: bool = False, what: str = "PyTorch checkpoint") -> Any:
    """The object saved in an existing file ``path``, read with ``torch.load(weights_only=True)``.

    ``mmap``: map the tensors instead of reading them (zip-format files only). Raises
    :class:`TorchFileError` for a file that is not a PyTorch file, is damaged, or holds objects that
    safe loading refuses; ``what`` names the kind of file in the message.
    """
    path = os.fspath(path)
    if not looks_like_torch_file(path):
        raise TorchFileError(f"{path} is not a {what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise TorchFileError(f"{path}: holds objects that safe (weights_only) loading refuses: "
                             f"{_reason(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - report any reading problem with the path
        raise TorchFileError(f"{path} is not a readable {what} (truncated or corrupted?): {_reason(exc)}") from exc
