"""Next-token negative log-likelihood: the one computation behind training loss, validation PPL and ``perplexity()``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of predicting ``labels[:, t+1]`` from ``logits[:, t]``, and the number of scored tokens.

    Args:
        logits: ``(B, T, V)`` model outputs, any float dtype (the log-softmax runs in float32).
        labels: ``(B, T)`` token ids; positions equal to ``ignore_index`` are not scored.
        ignore_index: label value that marks unscored positions (prompt or padding).

    Returns:
        ``(sum_nll, count)``: a float64 scalar and an int64 scalar, so sums stay exact across batches and ranks.

    Raises:
        ValueError: if the shapes do not line up.
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be (batch, seq_len, vocab), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"`labels` must be (batch, seq_len) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )  # (B*(T-1),) float32; ignored positions are 0
    # Summed in float64 so the total does not depend on how tokens are split into batches (a float32 sum moves the
    # mean NLL by about one ulp with the batch size).
    count = (shift_labels != ignore_index).sum()
    return nll.sum(dtype=torch.float64), count


def labels_for(
    input_ids: torch.Tensor, labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The labels to score: ``labels`` when given, else ``input_ids`` with padding (``attention_mask == 0``) ignored.

    Training, validation and :func:`lit_prune.eval.perplexity` all call this, so padded batches are scored the
    same way on every path.
    """
    if labels is not None:
        return labels
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def perplexity_from_nll(sum_nll: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``exp(sum_nll / count)``; NaN when nothing was scored."""
    if int(count) == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return torch.exp(sum_nll.double() / count.double())
