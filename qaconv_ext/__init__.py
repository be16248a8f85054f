"""qaconv-ext: fused QAConv matching for person re-identification, and the method around it."""
import torch  # noqa: F401  (import torch before the compiled extension)

from .ops import native_available, qaconv_match, qaconv_score, reference

__version__ = "0.1.0"

__all__ = ["qaconv_match", "qaconv_score", "native_available", "reference", "__version__"]
