"""Next-token distillation loss: KL(teacher ‖ student) over the supervised positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_prune.functional.perplexity import IGNORE_INDEX
from lit_prune.functional.similarity import token_kl


def next_token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of ``KL(p_teacher ‖ p_student)`` at the positions whose next token is supervised.

    Position t predicts token t+1 (as in :func:`~lit_prune.functional.next_token_nll`), so the logits at t count
    when ``labels[:, t+1] != ignore_index``. Both distributions are softened by ``temperature`` and the KL is
    scaled by ``temperature²`` (Hinton et al.), which keeps its gradient on the scale of the CE loss. The per-position
    KL is :func:`~lit_prune.functional.similarity.token_kl`.

    Args:
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)`` on the same device.
        labels: ``(B, T)``, ``ignore_index`` where not supervised.
        temperature: softening temperature, > 0.
        ignore_index: label value of positions that are not supervised.

    Returns:
        ``(kl_sum, count)``: float32 sum over counted positions (differentiable in ``student_logits``) and the count.

    Raises:
        ValueError: for mismatched shapes or a non-positive temperature.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape [batch, seq_len, vocab], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != labels.shape:
        expected = tuple(student_logits.shape[:2])
        raise ValueError(f"labels must be [batch, seq_len] = {expected}, got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature!r}")
    keep = labels[:, 1:] != ignore_index  # (B, T-1)
    student = student_logits[:, :-1][keep].float() / temperature  # (N, V)
    teacher = teacher_logits[:, :-1][keep].float() / temperature  # (N, V)
    log_p_teacher = F.log_softmax(teacher, dim=-1)
    kl = token_kl(log_p_teacher, student).sum() * temperature**2  # (N,) per position, then their sum
    return kl, keep.sum()
