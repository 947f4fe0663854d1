"""Streaming statistics gathered by forward hooks in one calibration pass (torchmetrics ``Metric`` s, sum-reduced).

* :mod:`lit_prune.stats.depth`: per block, its input and output (Block Influence, angular distance, linear CKA).
* :mod:`lit_prune.stats.candidates`: per candidate block, the model with and without it (global criteria).
* :mod:`lit_prune.stats.hooks`: :class:`Hooks`, which owns hooks and always removes them.
"""

from lit_prune.stats._common import Batch, Batches, CKASums
from lit_prune.stats.candidates import GLOBAL_METRICS, GlobalStatistics, GlobalStats, collect_global_statistics
from lit_prune.stats.depth import DEPTH_NEEDS, DepthStatistics, DepthStats, collect_depth_statistics
from lit_prune.stats.hooks import Hooks

__all__ = [
    "DEPTH_NEEDS",
    "GLOBAL_METRICS",
    "Batch",
    "Batches",
    "CKASums",
    "DepthStatistics",
    "DepthStats",
    "GlobalStatistics",
    "GlobalStats",
    "Hooks",
    "collect_depth_statistics",
    "collect_global_statistics",
]
