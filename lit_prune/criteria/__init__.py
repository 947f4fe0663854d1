"""Importance criteria: pure functions from collected statistics to scores (higher = more important).

Each is registered once in :mod:`lit_prune.criteria.registry` with its name and what it needs;
:mod:`lit_prune.criteria.scoring` (``score_blocks``, ``score_width``) collects what a criterion needs, then scores.
The depth and width methods' options live in :mod:`lit_prune.criteria.depth_config` and
:mod:`lit_prune.criteria.width_config`.
"""

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
)
from lit_prune.criteria.depth_config import DepthConfig
from lit_prune.criteria.registry import Criterion, ScoreInputs, register_criterion
from lit_prune.criteria.scoring import score_blocks, score_width
from lit_prune.criteria.sparse import (
    SPARSE_CRITERIA,
    check_nm,
    hessian_from_sum,
    hessian_update,
    magnitude_scores,
    prune_mask,
    sparsegpt,
    wanda_scores,
)
from lit_prune.criteria.width import (
    WIDTH_CRITERIA,
    WidthScores,
    amp,
    amp_act,
    magnitude,
    wanda_sp,
    width_needs_for,
)
from lit_prune.criteria.width import random_scores as random_width_scores
from lit_prune.criteria.width import reversed_scores as reversed_width_scores
from lit_prune.criteria.width_config import WidthConfig

__all__ = [
    "DEPTH_CRITERIA",
    "GLOBAL_CRITERIA",
    "ONE_PASS",
    "SPARSE_CRITERIA",
    "WIDTH_CRITERIA",
    "Criterion",
    "DepthConfig",
    "ScoreInputs",
    "WidthConfig",
    "WidthScores",
    "amp",
    "amp_act",
    "angular",
    "angular_block",
    "bi",
    "check_nm",
    "cka",
    "cka_global",
    "consensus",
    "cosine_global",
    "hessian_from_sum",
    "hessian_update",
    "is_global",
    "kl_global",
    "magnitude",
    "magnitude_scores",
    "needs_for",
    "prune_mask",
    "random_scores",
    "random_width_scores",
    "register_criterion",
    "reversed_scores",
    "reversed_width_scores",
    "score_blocks",
    "score_width",
    "sparsegpt",
    "wanda_scores",
    "wanda_sp",
    "width_needs_for",
]
