"""Streaming metrics: sufficient statistics summed across batches and ranks (torchmetrics ``Metric``)."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from lit_prune.functional.perplexity import IGNORE_INDEX, next_token_nll, perplexity_from_nll


class Perplexity(Metric):
    """Token-level perplexity: ``exp(total NLL / scored tokens)`` over every update, all-reduced by summing.

    Unlike averaging per-batch perplexities, this weighs every token once, so it equals
    :func:`lit_prune.eval.perplexity` on the same windows whatever the batching or the number of ranks.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    sum_nll: torch.Tensor
    count: torch.Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state("sum_nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        """Add the next-token NLL of a batch of ``(B, T, V)`` logits against ``(B, T)`` labels."""
        nll, count = next_token_nll(logits, labels, self.ignore_index)
        # Out of place: after `trainer.validate`, Lightning may have reset the states under inference mode, and a
        # later `fit` (outside it) could not update inference tensors in place.
        self.sum_nll = self.sum_nll + nll.to(self.sum_nll.device)
        self.count = self.count + count.to(self.count.device)

    def compute(self) -> torch.Tensor:
        """Perplexity over everything seen since the last reset."""
        return perplexity_from_nll(self.sum_nll, self.count)
