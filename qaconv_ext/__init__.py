"""qaconv-ext: fused QAConv matching for person re-identification, and the method around it."""
import torch  # noqa: F401  (import torch before the compiled extension)

from .evaluation import evaluate_rank
from .head import QAConv
from .losses import ClassMemoryLoss
from .models import build_backbone
from .ops import native_available, qaconv_match, qaconv_score, reference

__version__ = "0.1.0"

__all__ = ["qaconv_match", "qaconv_score", "native_available", "reference", "QAConv", "ClassMemoryLoss",
           "build_backbone", "evaluate_rank", "__version__"]
