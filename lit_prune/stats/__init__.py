"""Streaming statistics gathered by forward hooks in one calibration pass (torchmetrics ``Metric`` s, sum-reduced).

* :mod:`lit_prune.stats.engine`: the pass driver, one-shot (:func:`run_pass`) and block by block
  (:func:`sequential_pass`); every calibration pass of lit-prune runs there.
* :mod:`lit_prune.stats.collect`: :func:`collect_statistics`, everything a :class:`StatisticsRequest` names in one
  pass.
* :mod:`lit_prune.stats.depth`: per block, its input and output (Block Influence, angular distance, linear CKA).
* :mod:`lit_prune.stats.width`: per head and MLP neuron, AMP contributions and Wanda column norms.
* :mod:`lit_prune.stats.candidates`: per candidate block, the model with and without it (global criteria).
* :mod:`lit_prune.stats.hooks`: :class:`Hooks`, which owns hooks and always removes them.
"""

from lit_prune.stats._common import Batch, Batches, CKASums
from lit_prune.stats.candidates import GLOBAL_METRICS, GlobalStatistics, GlobalStats, collect_global_statistics
from lit_prune.stats.collect import Statistics, StatisticsRequest, collect_statistics
from lit_prune.stats.depth import DEPTH_NEEDS, DepthStatistics, DepthStats, collect_depth_statistics
from lit_prune.stats.engine import run_pass, sequential_pass
from lit_prune.stats.hooks import Hooks
from lit_prune.stats.width import WIDTH_NEEDS, WIDTH_SITES, WidthStatistics, WidthStats, collect_width_statistics

__all__ = [
    "DEPTH_NEEDS",
    "GLOBAL_METRICS",
    "WIDTH_NEEDS",
    "WIDTH_SITES",
    "Batch",
    "Batches",
    "CKASums",
    "DepthStatistics",
    "DepthStats",
    "GlobalStatistics",
    "GlobalStats",
    "Hooks",
    "Statistics",
    "StatisticsRequest",
    "WidthStatistics",
    "WidthStats",
    "collect_depth_statistics",
    "collect_global_statistics",
    "collect_statistics",
    "collect_width_statistics",
    "run_pass",
    "sequential_pass",
]
