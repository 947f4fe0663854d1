"""Width criteria: one score per query head and per MLP neuron of every block, higher = more important.

(The statistics pass and the criteria themselves are added below :class:`WidthScores`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WidthScores:
    """Per-block importance of query heads and MLP neurons (float32, on CPU; higher = more important).

    Args:
        heads: one ``(H_b,)`` tensor per block: the score of every query head of block ``b`` (GQA: query head
            ``h`` belongs to KV head ``h // (H_b / G_b)``).
        neurons: one ``(I_b,)`` tensor per block: the score of every MLP neuron of block ``b``.
        criterion: the criterion that produced them, e.g. ``"amp"``.
    """

    heads: tuple[Tensor, ...]
    neurons: tuple[Tensor, ...]
    criterion: str = ""

    def __post_init__(self) -> None:
        heads, neurons = tuple(self.heads), tuple(self.neurons)
        if len(heads) != len(neurons):
            raise ValueError(f"WidthScores needs one head and one neuron tensor per block, got {len(heads)} and {len(neurons)}")
        for kind, values in (("heads", heads), ("neurons", neurons)):
            for b, t in enumerate(values):
                if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() == 0:
                    raise ValueError(f"WidthScores.{kind}[{b}] must be a non-empty 1-D tensor, got {t!r}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"WidthScores.{kind}[{b}] holds non-finite scores")
        object.__setattr__(self, "heads", tuple(t.detach().float().cpu() for t in heads))
        object.__setattr__(self, "neurons", tuple(t.detach().float().cpu() for t in neurons))

    @property
    def num_blocks(self) -> int:
        """Number of blocks scored."""
        return len(self.heads)
