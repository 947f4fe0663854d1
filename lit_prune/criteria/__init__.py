"""Importance criteria: pure functions from collected statistics to scores (higher = more important)."""

from lit_prune.criteria.depth import (
    DEPTH_CRITERIA,
    GLOBAL_CRITERIA,
    ONE_PASS,
    angular,
    angular_block,
    bi,
    cka,
    cka_global,
    consensus,
    cosine_global,
    is_global,
    kl_global,
    needs_for,
    random_scores,
    reversed_scores,
    score_blocks,
)
from lit_prune.criteria.width import (
    WIDTH_CRITERIA,
    WidthScores,
    amp,
    magnitude,
    score_width,
    wanda_sp,
    width_needs_for,
)
from lit_prune.criteria.width import random_scores as random_width_scores
from lit_prune.criteria.width import reversed_scores as reversed_width_scores

__all__ = [
    "DEPTH_CRITERIA",
    "GLOBAL_CRITERIA",
    "ONE_PASS",
    "WIDTH_CRITERIA",
    "WidthScores",
    "amp",
    "angular",
    "angular_block",
    "bi",
    "cka",
    "cka_global",
    "consensus",
    "cosine_global",
    "is_global",
    "kl_global",
    "magnitude",
    "needs_for",
    "random_scores",
    "random_width_scores",
    "reversed_scores",
    "reversed_width_scores",
    "score_blocks",
    "score_width",
    "wanda_sp",
    "width_needs_for",
]
