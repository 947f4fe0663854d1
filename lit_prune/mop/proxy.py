"""MoP proxies: how much worse a candidate is, measured on held-out calibration windows (lower = better).

* ``ppl``: perplexity of the candidate on the windows.
* ``kl``: mean over tokens of KL(dense ‖ candidate) between next-token distributions; the dense distributions are
  computed once, before the first step, and kept in float16 on the CPU (``tokens × vocab × 2`` bytes).
* ``cosine``: 1 − mean cosine similarity between the candidate's and the dense model's final hidden states.
* ``random``: no measurement; the branch is drawn with a seeded generator.

Sums are float64 :class:`LossSums` states reduced across DDP ranks, so every rank sees the same proxy values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lit_prune.arch import adapter_for
from lit_prune.functional.perplexity import labels_for, next_token_nll
from lit_prune.stats._common import Batch, _as_inputs

PROXIES = ("ppl", "kl", "cosine", "random")
"""Every proxy name MoP accepts."""


class LossSums(Metric):
    """A float64 sum of losses and the count behind it, summed across ranks; ``compute()`` is the mean."""

    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: Tensor, count: Tensor) -> None:  # type: ignore[override]
        """Add a batch's summed loss and its number of terms."""
        self.total += total.detach().to(self.total.device, torch.float64)
        self.count += count.detach().to(self.count.device, torch.float64)

    def compute(self) -> Tensor:
        """Mean loss; ``inf`` when nothing was counted."""
        return self.total / self.count if self.count > 0 else torch.tensor(float("inf"), dtype=torch.float64)


def _forward(model: nn.Module, proxy: str, ids: Tensor, mask: Tensor | None) -> Tensor:
    """Logits (``ppl``/``kl``) or post-norm final hidden states (``cosine``) of ``model`` on a batch."""
    if proxy == "cosine":
        return adapter_for(model).forward_decoder(model, ids, mask).last_hidden_state
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def reference_outputs(model: nn.Module, batches: Sequence[Batch], proxy: str, device: torch.device) -> list[Tensor]:
    """What the dense model computes on each batch, for ``kl`` (float16 log-probs) and ``cosine`` (hidden states).

    Returns an empty list for ``ppl`` and ``random``, which need no reference.
    """
    if proxy not in ("kl", "cosine"):
        return []
    out = []
    with torch.no_grad():
        for item in batches:
            ids, mask = _as_inputs(item)
            mask = None if mask is None else mask.to(device)
            value = _forward(model, proxy, ids.to(device), mask).float()
            if proxy == "kl":  # clamped: a float16 -inf would turn 0 * (-inf) into NaN in the KL sum
                value = F.log_softmax(value, dim=-1).clamp_min(-1e4).half()
            out.append(value.cpu())  # on the CPU: the accelerator keeps room for the candidates
    return out


def batch_loss(
    model: nn.Module, item: Batch, proxy: str, reference: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(summed loss, count)`` of ``model`` on one batch under ``proxy`` (``ppl``: summed NLL and tokens)."""
    ids, mask = _as_inputs(item)
    ids = ids.to(device)
    mask = None if mask is None else mask.to(device)
    out = _forward(model, proxy, ids, mask)
    if proxy == "ppl":
        return next_token_nll(out, labels_for(ids, None, mask))
    assert reference is not None
    valid = torch.ones(ids.shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    if proxy == "kl":
        dense = reference.to(device).float()
        per_token = (dense.exp() * (dense - F.log_softmax(out.float(), dim=-1))).sum(-1)
    else:
        per_token = 1.0 - F.cosine_similarity(out.float(), reference.to(device).float(), dim=-1)
    return per_token[valid].double().sum(), valid.sum()
