"""Pure tensor functions behind lit-prune's metrics (the torchmetrics functional-twin pattern)."""

from lit_prune.functional.distill import next_token_kl
from lit_prune.functional.perplexity import labels_for, next_token_nll, perplexity_from_nll

__all__ = ["labels_for", "next_token_kl", "next_token_nll", "perplexity_from_nll"]
