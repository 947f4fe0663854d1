"""Evaluation of a (pruned) causal LM: perplexity, latency and parameter counts."""

from lit_prune.eval.latency import LatencyResult, latency
from lit_prune.eval.params import ParamCount, count_params
from lit_prune.eval.perplexity import PerplexityResult, perplexity, perplexity_details

__all__ = [
    "LatencyResult",
    "ParamCount",
    "PerplexityResult",
    "count_params",
    "latency",
    "perplexity",
    "perplexity_details",
]
