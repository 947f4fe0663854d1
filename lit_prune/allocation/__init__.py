"""Allocation: how a pruning budget is spread over layers.

* :mod:`lit_prune.allocation.structured`: heads and MLP neurons per block (width pruning, ``make_width_plan``).
* :mod:`lit_prune.allocation.sparsity`: per-layer sparsity ratios for unstructured / N:M pruning (uniform, OWL,
  linear maps of per-layer scores, DSA-style operator chains, TRIM per-row refinement).
"""

from lit_prune.allocation.structured import check_width_options, make_width_plan, params_to_remove, uniform_ratio

__all__ = ["check_width_options", "make_width_plan", "params_to_remove", "uniform_ratio"]
