"""Layer-wise LoRA with CKA: which blocks get adapters (METHODS.md §4).

R_0 … R_L are the hidden states at the last non-pad token of each sample: R_0 entering block 0, R_i leaving block
i (the block's own output, not Hugging Face's post-final-norm ``last_hidden_state``, which would make the last
block look important). A block's importance is ``I_i = 1 − linear CKA(R_{i−1}, R_i)``; the blocks that change the
representation most get adapters. The sums behind CKA are the depth statistics' (float64, reduced over DDP ranks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from lit_prune.criteria.depth import score_blocks


def take_samples(batches: Iterable[dict[str, Any]], n_samples: int) -> list[dict[str, Any]]:
    """The first ``n_samples`` rows of ``batches`` (the last batch is cut), as a list of batches.

    Raises:
        ValueError: if ``n_samples`` < 1, a batch has no ``input_ids``, or there are no rows at all.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"`n_samples` must be an int >= 1, got {n_samples!r}")
    taken: list[dict[str, Any]] = []
    seen = 0
    for batch in _as_batches(batches):
        rows = int(batch["input_ids"].size(0))
        keep = min(rows, n_samples - seen)
        taken.append({k: v[:keep] if isinstance(v, Tensor) else v for k, v in batch.items()})
        seen += keep
        if seen >= n_samples:
            break
    if seen == 0:
        raise ValueError("No samples to compute CKA layer importance from: the data yielded no rows")
    return taken


def cka_importance(
    model: nn.Module, batches: Iterable[dict[str, Any]], n_samples: int = 128, progress: bool = False
) -> Tensor:
    """``I_i = 1 − linear CKA(R_{i−1}, R_i)`` of every block, ``(L,)`` float64 in ``[0, 1]``, from ``n_samples`` rows.

    An exact identity block has importance 0. Runs one forward pass in eval mode under ``no_grad``.
    """
    samples = take_samples(batches, n_samples)
    return score_blocks(model, samples, "cka", progress=progress)["cka"]


def select_blocks(importance: Tensor, ratio: float) -> list[int]:
    """The ``floor(ratio · L)`` most important blocks, in ascending index order (ties go to the lower index).

    Raises:
        ValueError: if ``ratio`` is not in (0, 1] or selects no block.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio!r}")
    num_blocks = int(importance.numel())
    k = math.floor(ratio * num_blocks + 1e-9)
    if k < 1:
        raise ValueError(f"`ratio`={ratio} selects no block of {num_blocks} (floor(ratio · L) = 0); raise it")
    order = sorted(range(num_blocks), key=lambda i: (-float(importance[i]), i))
    return sorted(order[:k])


def _as_batches(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"CKA layer selection needs batches as dicts with `input_ids`, got {got}")
        yield batch
