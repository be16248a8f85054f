"""Evaluation: ranking metrics, the evaluation tail (scores in, rows out) and the evaluation of a trained
model; the scoring primitives (``extract_features``, ``score_blocks``, ...) live in :mod:`qaconv_ext.scoring`
and are re-exported here."""
from .metrics import evaluate_rank
from .protocol import junk_mask, query_counts
from .scoring import (
    BASELINE_ROW,
    QACONV_ROW,
    RR_ROW,
    TLIFT_ROW,
    RERANK_MODES,
    QAConvEvaluation,
    evaluate_baseline,
    evaluate_qaconv,
    evaluate_qaconv_features,
    evaluate_scores,
    extract_features,
    format_metrics,
    rank_metrics,
    rerank_distance,
    score_blocks,
    score_rows,
    score_to_distance,
    self_score_blocks,
    tlift_distance,
)
from .trained import ROW_KEYS, evaluate_trained, metric_rows

__all__ = [
    "BASELINE_ROW", "QACONV_ROW", "RR_ROW", "TLIFT_ROW", "ROW_KEYS", "QAConvEvaluation", "RERANK_MODES", "evaluate_baseline",
    "evaluate_qaconv", "evaluate_qaconv_features", "evaluate_scores", "evaluate_rank", "evaluate_trained", "metric_rows", "extract_features", "format_metrics",
    "junk_mask", "query_counts", "rank_metrics", "rerank_distance", "score_blocks", "score_rows", "score_to_distance", "self_score_blocks",
    "tlift_distance",
]
