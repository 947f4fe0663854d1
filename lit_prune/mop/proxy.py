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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lit_prune.functional.perplexity import labels_for, next_token_nll
from lit_prune.functional.similarity import masked_count, masked_sum, token_cosine, token_kl
from lit_prune.stats._common import Batch
from lit_prune.stats.engine import Output, run_pass

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


def proxy_output(proxy: str) -> Output:
    """What the pass driver must return for ``proxy``: the logits (``ppl``/``kl``) or the final hidden states."""
    return "hidden" if proxy == "cosine" else "logits"


def _tensor(output: Any) -> Tensor:
    """The logits, or the post-norm final hidden states of a decoder output."""
    return output if isinstance(output, Tensor) else output.last_hidden_state


def reference_outputs(model: nn.Module, batches: Sequence[Batch], proxy: str) -> list[Tensor]:
    """What the dense model computes on each batch, for ``kl`` (float16 log-probs) and ``cosine`` (hidden states).

    One :func:`~lit_prune.stats.engine.run_pass`; returns an empty list for ``ppl`` and ``random``, which need no
    reference.
    """
    if proxy not in ("kl", "cosine"):
        return []
    out: list[Tensor] = []

    def keep(hf_model: nn.Module, ids: Tensor, mask: Tensor | None, output: Any) -> None:
        value = _tensor(output).float()
        if proxy == "kl":  # clamped: a float16 -inf would turn 0 * (-inf) into NaN in the KL sum
            value = F.log_softmax(value, dim=-1).clamp_min(-1e4).half()
        out.append(value.cpu())  # on the CPU: the accelerator keeps room for the candidates

    run_pass(model, batches, {}, on_batch=keep, output=proxy_output(proxy), desc="MoP reference")
    return out


def proxy_loss(
    output: Any, ids: Tensor, mask: Tensor | None, proxy: str, reference: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(summed loss, count)`` of one batch's ``output`` (see :func:`proxy_output`) under ``proxy``.

    ``ppl``: summed next-token NLL and scored tokens; ``kl`` / ``cosine``: summed per-token divergence from the dense
    ``reference`` of the batch and the non-pad tokens.
    """
    out = _tensor(output)
    if proxy == "ppl":
        return next_token_nll(out, labels_for(ids, None, mask))
    assert reference is not None
    if proxy == "kl":
        per_token = token_kl(reference.to(out.device).float(), out)
    else:
        per_token = 1.0 - token_cosine(out, reference.to(out.device))
    return masked_sum(per_token, mask), masked_count(per_token, mask)
