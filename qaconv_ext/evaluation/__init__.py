"""Evaluation: ranking metrics (and scoring helpers)."""
from .metrics import evaluate_rank  # noqa: F401
from .scoring import (  # noqa: F401,E402
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
