"""qaconv-ext: fused QAConv matching for person re-identification, and the method around it.

The public names are imported on first use, so that ``import qaconv_ext`` (and the ``qaconv``
command's ``--help``) does not load PyTorch until something needs it.
"""
from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

#: Each public name and the part of the package it lives in.
_HOMES = {
    "qaconv_match": "ops", "qaconv_score": "ops", "native_available": "ops", "reference": "ops",
    "cpu_kernel": "ops", "build_info": "ops",
    "QAConv": "head", "ClassMemoryLoss": "losses", "TripletLoss": "losses", "PairwiseMatchingLoss": "losses", "build_backbone": "models", "evaluate_rank": "evaluation",
    "tlift": "postprocess", "k_reciprocal_rerank": "postprocess",
}

__all__ = [*_HOMES, "__version__"]

#: The parts of the package, importable as attributes (``qaconv_ext.engine`` after ``import qaconv_ext``).
_PARTS = ("cli", "data", "distributed", "engine", "evaluation", "head", "losses", "models", "ops", "postprocess",
          "search", "utils", "viz")


def _public(name: str) -> Any:
    """The public name ``name`` of :data:`__all__`, imported from where it lives."""
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


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
