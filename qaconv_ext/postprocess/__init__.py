"""Post-processing of match scores: temporal lifting and k-reciprocal re-ranking."""
from .rerank import k_reciprocal_rerank  # noqa: F401
from .tlift import tlift  # noqa: F401
