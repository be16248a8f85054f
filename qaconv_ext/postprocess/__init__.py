"""Post-processing of match scores: temporal lifting and k-reciprocal re-ranking."""
from .rerank import k_reciprocal_rerank
from .tlift import tlift

__all__ = ["k_reciprocal_rerank", "tlift"]
