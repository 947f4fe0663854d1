"""Distillation from the model as it was before pruning: a frozen teacher and the loss term it adds.

Memory cost: the teacher is a second full copy of the unpruned weights (parameters × bytes per parameter, e.g.
538 MB for SmolLM2-135M in float32) on ``device``, and every training step also holds the teacher's logits
(batch × seq_len × vocab floats, 200 MB for 4 × 256 tokens of a 49k vocabulary) plus their softmax. Put the teacher
on another device (``teacher_device="cpu"`` while training on a GPU) when the student's device is full; its
forward then runs there and only the logits travel.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from lit_prune.functional.distill import next_token_kl
from lit_prune.recovery.lora import is_lora

log = logging.getLogger(__name__)


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter frozen, in place; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen (the distillation teacher).

    Raises:
        TypeError: if ``model`` carries unmerged LoRA adapters (merge them first so the teacher is plain).
    """
    if is_lora(model):
        raise TypeError("The teacher must be a plain model; merge its LoRA adapters before copying it")
    return freeze(copy.deepcopy(model))


class Distillation:
    """The ``α · KL(teacher ‖ student)`` term added to the next-token loss during recovery.

    Deliberately not an ``nn.Module``: the teacher is neither saved in the student's checkpoints nor given to its
    optimizer, and Lightning does not move it; it stays on ``device``.

    Args:
        teacher: the frozen teacher (see :func:`frozen_copy`).
        alpha: weight of the KL term.
        temperature: softening temperature of both distributions.
        device: where the teacher runs; None keeps it where it is.

    Raises:
        ValueError: for a negative ``alpha`` or a non-positive ``temperature``.
    """

    def __init__(
        self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0, device: str | torch.device | None = None
    ) -> None:
        if not alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0, got {alpha!r}")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be positive, got {temperature!r}")
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        """Where the teacher's weights are."""
        return next(self.teacher.parameters()).device

    def to(self, device: str | torch.device) -> Distillation:
        """Move the teacher to ``device``."""
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, T, V)`` teacher logits on the device of ``input_ids``."""
        here = self.device
        mask = None if attention_mask is None else attention_mask.to(here)
        out = self.teacher(input_ids=input_ids.to(here), attention_mask=mask, use_cache=False)
        return out.logits.to(input_ids.device)

    def kl(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Mean ``KL(teacher ‖ student)`` over the supervised next-token positions (0 when none are)."""
        teacher = self.teacher_logits(input_ids, attention_mask)
        total, count = next_token_kl(student_logits, teacher, labels, self.temperature)
        return total / count.clamp_min(1)
