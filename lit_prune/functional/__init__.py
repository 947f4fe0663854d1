"""Pure tensor functions behind lit-prune's metrics (the torchmetrics functional-twin pattern)."""

from lit_prune.functional.perplexity import next_token_nll, perplexity_from_nll

__all__ = ["next_token_nll", "perplexity_from_nll"]
