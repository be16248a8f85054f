"""Evaluation: ranking metrics (and scoring helpers)."""
from .metrics import evaluate_rank
from .scoring import (
    BASELINE_ROW,
    QACONV_ROW,
    RR_ROW,
    TLIFT_ROW,
    evaluate_baseline,
    evaluate_qaconv,
    extract_features,
    format_metrics,
    qaconv_scores,
    qaconv_self_scores,
    rank_metrics,
    rerank_distance,
    score_to_distance,
    tlift_distance,
)

__all__ = [
    "BASELINE_ROW", "QACONV_ROW", "RR_ROW", "TLIFT_ROW", "evaluate_baseline", "evaluate_qaconv", "evaluate_rank",
    "extract_features", "format_metrics", "qaconv_scores", "qaconv_self_scores", "rank_metrics",
    "rerank_distance", "score_to_distance", "tlift_distance",
]
