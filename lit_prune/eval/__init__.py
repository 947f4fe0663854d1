"""Evaluation of a (pruned) causal LM: perplexity, zero-shot accuracy, latency and parameter counts."""

from lit_prune.eval.latency import LatencyComparison, LatencyResult, Ratio, compare_latency, latency
from lit_prune.eval.params import ParamCount, count_params
from lit_prune.eval.perplexity import PerplexityResult, perplexity, perplexity_details
from lit_prune.eval.summary import EvalSummary, evaluate_model, format_table
from lit_prune.eval.zeroshot import ZeroShotResult, zero_shot

__all__ = [
    "EvalSummary",
    "LatencyComparison",
    "LatencyResult",
    "ParamCount",
    "PerplexityResult",
    "Ratio",
    "ZeroShotResult",
    "compare_latency",
    "count_params",
    "evaluate_model",
    "format_table",
    "latency",
    "perplexity",
    "perplexity_details",
    "zero_shot",
]
