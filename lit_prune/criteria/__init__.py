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

__all__ = [
    "DEPTH_CRITERIA",
    "GLOBAL_CRITERIA",
    "ONE_PASS",
    "angular",
    "angular_block",
    "bi",
    "cka",
    "cka_global",
    "consensus",
    "cosine_global",
    "is_global",
    "kl_global",
    "needs_for",
    "random_scores",
    "reversed_scores",
    "score_blocks",
]
