"""qaconv-ext: fused QAConv matching for person re-identification, and the method around it.

The public names are imported on first use, so that ``import qaconv_ext`` (and the ``qaconv``
command's ``--help``) does not load PyTorch until something needs it.
"""
from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

__all__ = ["qaconv_match", "qaconv_score", "native_available", "reference", "QAConv", "ClassMemoryLoss",
           "build_backbone", "evaluate_rank", "__version__"]

#: The parts of the package, importable as attributes (``qaconv_ext.engine`` after ``import qaconv_ext``).
_PARTS = ("cli", "data", "engine", "evaluation", "head", "losses", "models", "ops", "postprocess", "utils",
                "viz")


def _public(name: str) -> Any:
    """The public name ``name`` of :data:`__all__`, imported from where it lives."""
    if name in ("qaconv_match", "qaconv_score", "native_available", "reference"):
        from . import ops
        return getattr(ops, name)
    if name == "QAConv":
        from .head import QAConv
        return QAConv
    if name == "ClassMemoryLoss":
        from .losses import ClassMemoryLoss
        return ClassMemoryLoss
    if name == "build_backbone":
        from .models import build_backbone
        return build_backbone
    if name == "evaluate_rank":
        from .evaluation import evaluate_rank
        return evaluate_rank
    raise AttributeError(name)


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = _public(name)
    elif name in _PARTS:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value   # imported once; later look-ups do not come here
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__) | set(_PARTS))
