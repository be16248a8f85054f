"""Interpretability pictures: QAConv's local correspondences and ranked lists (Pillow only)."""
from .correspondences import (
    Segment,
    average_match,
    correspondence_segments,
    draw_correspondences,
    draw_matches,
    head_contributions,
    head_logit,
    infer_stride,
    load_image,
    location_centers,
    match_pair,
    relative_contributions,
    strength_colormap,
)
from .ranklist import (
    RankCell,
    draw_ranked_list,
    rank_gallery,
    stack_pictures,
)

__all__ = [
    "draw_correspondences", "draw_matches", "correspondence_segments", "Segment",
    "head_contributions", "relative_contributions", "average_match", "head_logit", "match_pair", "infer_stride", "location_centers",
    "load_image", "strength_colormap",
    "draw_ranked_list", "rank_gallery", "RankCell", "stack_pictures",
]
