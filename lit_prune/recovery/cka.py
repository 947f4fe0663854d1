"""Layer-wise LoRA with CKA: which blocks get adapters (METHODS.md §4).

R_0 … R_L are the hidden states at the last non-pad token of each sample: R_0 entering block 0, R_i leaving block
i (the block's own output, not Hugging Face's post-final-norm ``last_hidden_state``, which would make the last
block look important). A block's importance is ``I_i = 1 − linear CKA(R_{i−1}, R_i)``, the ``cka`` depth criterion
on the same statistic (:class:`~lit_prune.stats.DepthStatistics` with need ``cka_last``); the blocks that change
the representation most get adapters.

Memory follows the cheaper exact form of CKA (:func:`~lit_prune.functional.similarity.cka_form`): for ``n`` samples
narrower than the width ``d`` (the usual case) the rows are kept (``(L+1) × n × d`` float64, 138 MB for a 7B LLaMA
at n = 128) and CKA is computed from ``n × n`` Gram matrices; from ``n >= d`` on, from ``d × d`` Gram sums
(``(2L+1) d²`` float64), which do not grow with ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor, nn

from lit_prune.arch import adapter_for
from lit_prune.criteria.depth import cka
from lit_prune.functional import similarity
from lit_prune.stats import collect_depth_statistics
from lit_prune.stats.depth import CKARows


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


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two ``(n, d)`` representations of the same n samples, as a float.

    ``CKA = ⟨K, L⟩ / (‖K‖ ‖L‖)`` with ``K = X̃X̃ᵀ``, ``L = ỸỸᵀ`` of the column-centred features (equal to
    ``‖ỸᵀX̃‖² / (‖X̃ᵀX̃‖ ‖ỸᵀỸ‖)``; the ``n × n`` form when ``n < d``, else the ``d × d`` one). Constant features (a zero
    centred Gram): 1 if both sides are constant, else 0. The formula is
    :func:`lit_prune.functional.similarity.linear_cka`.

    Raises:
        ValueError: if the shapes differ in the number of rows or there are fewer than 2 rows.
    """
    if x.dim() != 2 or y.dim() != 2 or x.size(0) != y.size(0) or x.size(0) < 2:
        raise ValueError(
            f"linear_cka needs (n, d) inputs with the same n >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return float(similarity.linear_cka(x, y))


def cka_importance(
    model: nn.Module, batches: Iterable[dict[str, Any]], n_samples: int = 128, progress: bool = False
) -> Tensor:
    """``I_i = 1 − linear CKA(R_{i−1}, R_i)`` of every block, ``(L,)`` float64 in ``[0, 1]``, from ``n_samples`` rows.

    The statistic and formula of the ``cka`` depth criterion (:func:`lit_prune.criteria.depth.cka`, last token),
    collected by :func:`~lit_prune.stats.collect_depth_statistics` in one forward pass of the decoder in eval mode
    under ``no_grad``. An exact identity block has importance 0. With ``n`` rows of width ``d`` the rows are kept
    when ``n < d`` (the ``n × n`` form, ``(L+1) n d`` float64 on the model's device) and ``d × d`` sums otherwise
    (``(2L+1) d²`` float64); :func:`~lit_prune.functional.similarity.cka_form` chooses from ``n_samples`` (so every
    DDP rank keeps the same states). Under DDP the statistics are reduced over ranks: each rank contributes its own
    rows and every rank gets the importance of all ranks' samples.

    Raises:
        ValueError: if the batches hold fewer than 2 samples (CKA compares samples).
    """
    samples = take_samples(batches, n_samples)
    form = similarity.cka_form(n_samples, adapter_for(model).hidden_size(model))  # the same on every DDP rank
    stats = collect_depth_statistics(model, samples, {"cka_last"}, progress=progress, cka_form=form).compute()
    sums = stats.cka_last
    assert sums is not None
    seen = int(sums.rows.size(1)) if isinstance(sums, CKARows) else int(sums.count[0])  # without fully padded rows
    if seen < 2:
        raise ValueError(f"CKA layer importance needs at least 2 samples, got {seen}")
    return cka(stats, "last").cpu()


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
