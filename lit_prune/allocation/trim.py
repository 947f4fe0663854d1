"""TRIM: per-output-row sparsity on top of any layer ratio, refined so that the rows' output cosine equalises.

Given one Linear's weight, its per-weight scores (e.g. Wanda's; the lowest of a row go first), calibration inputs at
the last token of each sequence and the layer's total prune count, :func:`trim` returns per-row counts summing exactly
to that count (METHODS.md §5; the reference is ``flobk/TRIM``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from lit_prune._validation import check_int
from lit_prune.allocation.sparsity import _F64, _TINY, _integer_counts, _real, _shift_into_band

log = logging.getLogger(__name__)


def _cosines(dense: Tensor, pruned: Tensor) -> tuple[Tensor, float]:
    """Per-output-row cosine (1 where the dense output is zero) and the cosine of the flattened outputs."""
    a, b = dense.to(_F64), pruned.to(_F64)  # (n, out)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    dot = (a * b).sum(dim=0)
    rows = torch.where(na > 0, dot / (na * nb).clamp(min=_TINY), torch.ones_like(dot)).clamp(-1.0, 1.0)
    flat = float((a * b).sum()) / max(float(a.norm() * b.norm()), _TINY)
    return rows, flat


def trim(
    weight: Tensor,
    scores: Tensor,
    inputs: Tensor,
    count: int,
    iterations: int = 10,
    learning_rates: Sequence[float] = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16, -0.01, -0.02, -0.04),
    max_row_sparsity: float = 0.95,
) -> Tensor:
    """TRIM per-row prune counts for one Linear, summing exactly to the layer's ``count``.

    Row ``r`` prunes its ``k_r`` lowest-scored weights. As the TRIM code (``calculate_row_wise_sparsities``): start
    uniform (``s = count / numel``); for a learning rate ``η``, ``iterations`` times: each row's output cosine ``c_r``
    (``W_r·X`` against the pruned row's output), ``d = 2η·minmax(c)``, ``s_r += d_r - mean(d)`` (rows that keep their
    output well take more sparsity), clipped to ``[0, max(max_row_sparsity, s)]`` with mean ``s`` and rounded to exact
    counts. The counts with the best layer cosine (flattened outputs) seen win, the uniform start included: never worse
    than uniform on that metric. Positive rates are tried in order while each beats the previous one; the negative
    ones, likewise, only if no positive rate beat uniform.

    Args:
        weight: the Linear's weight, ``(out, in)``.
        scores: per-weight scores, ``(out, in)``, lowest pruned first within a row (e.g. Wanda).
        inputs: calibration inputs to the Linear, ``(n, in)`` (TRIM uses each sequence's last token).
        count: weights to prune in this Linear, in ``[0, out·in]``.
        iterations: refinement steps per learning rate (0 returns the uniform split).
        learning_rates: the ``η`` sweep, non-zero.
        max_row_sparsity: the highest sparsity a row may reach, in (0, 1] (raised to ``s`` if below it).

    Returns:
        ``(out,)`` int64 counts on ``weight``'s device, each in ``[0, in]``, summing to ``count``.

    Raises:
        ValueError: on a shape mismatch (the message shows the shapes) or an argument out of range.
    """
    if weight.ndim != 2 or scores.shape != weight.shape or inputs.ndim != 2 or inputs.shape[1] != weight.shape[1]:
        shapes = f"weight.shape={tuple(weight.shape)}, scores.shape={tuple(scores.shape)}"
        raise ValueError(
            f"`weight`, `scores` must be (out, in), `inputs` (n, in), got {shapes}, inputs.shape={tuple(inputs.shape)}"
        )
    n_out, n_in = weight.shape
    check_int("count", count, minimum=0)
    if count > n_out * n_in:
        raise ValueError(f"`count` must be at most out·in = {n_out * n_in}, got {count}")
    check_int("iterations", iterations, minimum=0)
    cap = _real("max_row_sparsity", max_row_sparsity, 0.0, 1.0, open_low=True, open_high=False)
    rates = list(learning_rates)
    if not all(isinstance(r, Real) and not isinstance(r, bool) and math.isfinite(r) and r != 0 for r in rates):
        raise ValueError(f"`learning_rates` must be finite non-zero numbers, got {rates}")

    device = weight.device
    caps = torch.full((n_out,), n_in, dtype=torch.long, device=device)
    s = count / (n_out * n_in)
    start = _integer_counts(torch.full((n_out,), s * n_in, dtype=_F64, device=device), caps, count)
    if count in (0, n_out * n_in) or iterations == 0 or n_out == 1 or not rates:
        return start
    dtype = _F64 if weight.dtype == _F64 else torch.float32
    w = weight.detach().to(dtype)
    x = inputs.detach().to(device=device, dtype=dtype)
    order = scores.detach().to(device).argsort(dim=1, stable=True)  # (out, in), lowest score first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_in, device=device).expand(n_out, -1))
    dense = x @ w.T  # (n, out)

    def evaluate(k: Tensor) -> tuple[Tensor, float]:
        return _cosines(dense, x @ (w * (rank >= k.unsqueeze(1))).T)

    start_rows, baseline = evaluate(start)
    ones = torch.ones(n_out, dtype=_F64, device=device)

    def run(rate: float) -> tuple[Tensor, float]:
        sparsities, rows = torch.full((n_out,), s, dtype=_F64, device=device), start_rows
        best_k, best = start, baseline
        for _ in range(iterations):
            d = 2 * rate * (rows - rows.min()) / (float(rows.max() - rows.min()) + 1e-6)
            sparsities = _shift_into_band(sparsities + d - d.mean(), ones, 0.0, max(cap, s), s)
            k = _integer_counts(sparsities * n_in, caps, count)
            rows, score = evaluate(k)
            if score > best:
                best_k, best = k, score
        return best_k, best

    best_k, best = start, baseline
    for sweep in ([r for r in rates if r > 0], [r for r in rates if r < 0]):
        if best > baseline:
            break  # a positive rate already improved on uniform: no negative sweep
        previous = -math.inf
        for rate in sweep:
            k, score = run(rate)
            if score > best:
                best_k, best = k, score
            if score <= previous:
                break
            previous = score
    log.debug("TRIM %dx%d, %d pruned: layer cosine %.6f (uniform) -> %.6f", n_out, n_in, count, baseline, best)
    return best_k
