"""Allocation: how a pruning budget is spread over layers.

* :mod:`lit_prune.allocation.depth`: which blocks a depth plan removes (``make_depth_plan``).
* :mod:`lit_prune.allocation.structured`: heads and MLP neurons per block (width pruning, ``make_width_plan``).
* :mod:`lit_prune.allocation.sparsity`: per-layer sparsity ratios for unstructured / N:M pruning (uniform, OWL,
  linear maps of per-layer scores, DSA-style operator chains) and exact integer counts.
* :mod:`lit_prune.allocation.trim`: TRIM's per-row refinement of one layer's count.
"""

from lit_prune.allocation.depth import MIN_CALIBRATION_WINDOWS, decision_margin, make_depth_plan
from lit_prune.allocation.sparsity import (
    DSA_PAPER_FUNCTION,
    SPARSITY_ALLOCATIONS,
    AllocationFunction,
    dsa,
    layer_counts,
    linear_map,
    outlier_ratio,
    owl,
    uniform,
)
from lit_prune.allocation.structured import check_width_options, make_width_plan, params_to_remove, uniform_ratio
from lit_prune.allocation.trim import trim

__all__ = [
    "DSA_PAPER_FUNCTION",
    "MIN_CALIBRATION_WINDOWS",
    "SPARSITY_ALLOCATIONS",
    "AllocationFunction",
    "check_width_options",
    "decision_margin",
    "dsa",
    "layer_counts",
    "linear_map",
    "make_depth_plan",
    "make_width_plan",
    "outlier_ratio",
    "owl",
    "params_to_remove",
    "trim",
    "uniform",
    "uniform_ratio",
]
