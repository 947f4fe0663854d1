"""Weight-level (unstructured and N:M) pruning: scores, keep masks and SparseGPT, as pure tensor functions.

Formulas (METHODS.md §5), for a Linear weight ``W`` of shape ``(out, in)``:

* :func:`magnitude_scores`: ``|W_ij|``;
* :func:`wanda_scores`: ``|W_ij|·‖X_j‖₂`` (Wanda), from the summed squares of each input feature;
* :func:`prune_mask`: the keep mask that prunes the lowest scores (per row, per layer, per row count, or N:M);
* :func:`sparsegpt`: SparseGPT (Frantar & Alistarh 2023): mask by ``w²/[H⁻¹]²_cc`` and OBS update, per block;
* :func:`hessian_update` / :func:`hessian_from_sum`: the SparseGPT statistic ``H = (2/n) Σ x xᵀ``.

No hooks and no model walking: the statistics come in as tensors. Masks are bool, True = the weight stays.
Ties are broken by a stable sort: the lower column (for a whole-matrix ranking, the lower row-major index) is
pruned first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_prune.criteria import registry
from lit_prune.criteria.registry import register_criterion


def check_nm(n_m: tuple[int, int] | list[int] | str | None) -> tuple[int, int] | None:
    """Validate an N:M pattern: ``N`` zeros in every group of ``M`` consecutive inputs (``2:4`` = 2 zeros in 4).

    Args:
        n_m: None (no pattern), ``(N, M)``, ``[N, M]`` or ``"N:M"``.

    Returns:
        ``(N, M)`` as ints, or None.

    Raises:
        ValueError: if ``n_m`` is not one of these forms or does not have ints ``0 < N < M``.

    Example:
        >>> check_nm("2:4"), check_nm([4, 8]), check_nm(None)
        ((2, 4), (4, 8), None)
    """
    if n_m is None:
        return None
    parts: list[object]
    if isinstance(n_m, str):
        parts = [int(p) if p.strip().isdigit() else p for p in n_m.split(":")]
    else:
        parts = list(n_m) if isinstance(n_m, tuple | list) else [n_m]
    if len(parts) == 2:
        n, m = parts
        if type(n) is int and type(m) is int and 0 < n < m:
            return n, m
    raise ValueError(f"`n_m` must be None, (N, M), [N, M] or 'N:M' with ints 0 < N < M, got {n_m!r}")


def _check_2d(tensor: Tensor, name: str) -> None:
    if not isinstance(tensor, Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"`{name}` must be a 2-D (out_features, in_features) tensor, got {shape}")


def magnitude_scores(weight: Tensor) -> Tensor:
    """Magnitude scores ``|W|`` (float32, detached), higher = more important.

    Raises:
        ValueError: if ``weight`` is not 2-D.
    """
    _check_2d(weight, "weight")
    return weight.detach().abs().float()


def wanda_scores(weight: Tensor, input_sq: Tensor) -> Tensor:
    """Wanda scores ``S_ij = |W_ij|·sqrt(input_sq_j)`` (float32), higher = more important.

    Args:
        weight: ``(out, in)`` Linear weight.
        input_sq: ``(in,)`` sum over calibration tokens of ``x_j²`` (any float dtype, float64 is best).

    Returns:
        ``(out, in)`` float32 scores on ``weight``'s device.

    Raises:
        ValueError: if the shapes do not match or ``input_sq`` has a negative entry.

    Example:
        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([4.0, 1.0]))
        tensor([[2., 2.]])
    """
    _check_2d(weight, "weight")
    if not isinstance(input_sq, Tensor) or input_sq.shape != (weight.size(1),):
        shape = tuple(input_sq.shape) if isinstance(input_sq, Tensor) else type(input_sq).__name__
        raise ValueError(
            f"`input_sq` must have shape (in_features,) = ({weight.size(1)},), got {shape} "
            f"for weight.shape={tuple(weight.shape)}"
        )
    if bool((input_sq < 0).any()):
        raise ValueError(f"`input_sq` must be sums of squares (>= 0), got min {input_sq.min().item()}")
    norm = input_sq.detach().double().sqrt().to(device=weight.device, dtype=torch.float32)  # (in,)
    return weight.detach().abs().float() * norm  # (out, in)


def _resolve_amount(
    amount: float | int | Tensor | None, rows: int, cols: int, nm: tuple[int, int] | None
) -> int | Tensor | None:
    """None under N:M, else the exact number of weights to prune: one int for the layer or an ``(out,)`` tensor."""
    if nm is not None:
        if cols % nm[1]:
            raise ValueError(f"N:M {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, got {cols}")
        ok = amount is None or (isinstance(amount, float) and math.isclose(amount, nm[0] / nm[1]))
        if not ok:
            raise ValueError(f"With `n_m`={nm[0]}:{nm[1]}, `amount` must be None or {nm[0] / nm[1]}, got {amount!r}")
        return None
    if isinstance(amount, Tensor):
        if amount.shape != (rows,) or amount.dtype.is_floating_point or amount.dtype.is_complex:
            raise ValueError(
                f"A tensor `amount` must be 1-D integer of shape (out_features,) = ({rows},), "
                f"got shape {tuple(amount.shape)} and dtype {amount.dtype}"
            )
        if amount.dtype == torch.bool or bool(((amount < 0) | (amount > cols)).any()):
            raise ValueError(f"Per-row `amount` counts must be ints in [0, {cols}], got {amount.tolist()}")
        return amount.long()
    if isinstance(amount, float) and 0.0 <= amount < 1.0:
        return round(amount * rows * cols)  # round half to even
    if isinstance(amount, int) and not isinstance(amount, bool) and 0 <= amount <= rows * cols:
        return amount
    raise ValueError(
        f"`amount` must be a float in [0, 1), an int in [0, {rows * cols}] or a (out_features,) "
        f"integer tensor (or None with `n_m`), got {amount!r}"
    )


def _spread(total: int, rows: int, device: torch.device) -> Tensor:
    """``(rows,)`` counts summing to ``total``: every row ``total // rows``, the first ``total % rows`` one more."""
    counts = torch.full((rows,), total // rows, dtype=torch.long, device=device)
    counts[: total % rows] += 1
    return counts


_FEW_COUNTS = 4
"""Up to this many distinct per-row counts, rows are cut at their k-th value (``kthvalue``, ~4x cheaper than a sort
on CPU); more (TRIM's per-row counts) sort every row once."""


def _row_prune(scores: Tensor, counts: Tensor) -> Tensor:
    """Bool PRUNE mask: the ``counts[r]`` lowest scores of every row ``r`` (stable: lower column first)."""
    counts = counts.to(scores.device)
    distinct = counts.unique()
    if distinct.numel() <= _FEW_COUNTS:
        prune = torch.zeros_like(scores, dtype=torch.bool)
        for k in distinct.tolist():
            rows = (counts == k).nonzero().squeeze(1)
            if k > 0:
                prune[rows] = _lowest_k(scores.index_select(0, rows), int(k))
        return prune
    order = torch.sort(scores, dim=1, stable=True).indices  # (out, w)
    ranks = torch.arange(scores.size(1), device=scores.device)  # (w,)
    prune_sorted = ranks.unsqueeze(0) < counts.to(scores.device).unsqueeze(1)  # (out, w)
    return torch.empty_like(prune_sorted).scatter_(1, order, prune_sorted)


def _lowest_k(scores: Tensor, k: int) -> Tensor:
    """Bool PRUNE mask of the ``k`` lowest scores of every row; ties at the k-th value go to the lower columns."""
    if k >= scores.size(1):
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1)
    below = scores < threshold
    ties = scores == threshold
    missing = k - below.sum(1, keepdim=True)  # how many of the tied values each row still prunes
    return below | (ties & (ties.cumsum(1) <= missing))


def _global_prune(scores: Tensor, count: int) -> Tensor:
    """Bool PRUNE mask: the ``count`` lowest scores of the matrix (stable: lower row-major index first)."""
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _lowest_k(scores.reshape(1, -1), count).view_as(scores)


def _nm_prune(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool PRUNE mask: the ``n`` lowest of every ``m`` consecutive columns of each row (stable)."""
    groups = scores.reshape(scores.size(0), -1, m)  # (out, in/m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    prune_sorted = (torch.arange(m, device=scores.device) < n).expand_as(groups)
    return torch.empty_like(prune_sorted).scatter_(2, order, prune_sorted).view_as(scores)


def prune_mask(
    scores: Tensor,
    amount: float | int | Tensor | None,
    *,
    n_m: tuple[int, int] | list[int] | str | None = None,
    per_row: bool = True,
) -> Tensor:
    """The bool KEEP mask (True = the weight stays) that prunes the lowest ``scores`` of a Linear.

    * ``n_m=(N, M)``: in every group of ``M`` consecutive input columns of each row, exactly the ``N`` lowest are
      pruned. ``amount`` must then be None or ``N/M`` and ``per_row`` is ignored.
    * float ``amount`` in ``[0, 1)``: exactly ``round(amount·numel)`` weights are pruned (Python ``round``: half
      to even). With ``per_row`` (Wanda: each output row is a comparison group) every row prunes ``k`` or ``k + 1``
      of its lowest, the ``k + 1`` going to the first rows; without it the whole matrix is ranked (magnitude
      pruning per layer).
    * int ``amount``: the exact number of weights to prune in the layer, spread like a float's.
    * ``(out,)`` integer tensor ``amount``: the exact number to prune in each row (TRIM); ``per_row`` is ignored.

    Ties are broken by a stable sort: the lower column (whole matrix: the lower row-major index) is pruned first.

    Args:
        scores: ``(out, in)`` importance scores, higher = more important.
        amount: what to prune (see above).
        n_m: an N:M pattern (see :func:`check_nm`).
        per_row: rank within each row (True) or over the whole matrix (False).

    Returns:
        ``(out, in)`` bool keep mask on ``scores``' device.

    Raises:
        ValueError: if ``scores`` is not 2-D or holds NaN, ``amount`` is out of range or does not fit ``n_m``,
            or ``in_features`` is not divisible by ``M``.

    Example:
        >>> prune_mask(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), 0.5)
        tensor([[ True, False,  True, False]])
    """
    _check_2d(scores, "scores")
    if bool(torch.isnan(scores).any()):
        raise ValueError("`scores` holds NaN")
    nm = check_nm(n_m)
    rows, cols = scores.shape
    target = _resolve_amount(amount, rows, cols, nm)
    if nm is not None:
        return ~_nm_prune(scores, *nm)
    if isinstance(target, Tensor):
        return ~_row_prune(scores, target)
    assert target is not None
    if per_row:
        return ~_row_prune(scores, _spread(target, rows, scores.device))
    return ~_global_prune(scores, target)


def _block_counts(total: int | Tensor, i1: int, i2: int, cols: int) -> int | Tensor:
    """``⌊total·i2/cols⌋ − ⌊total·i1/cols⌋``: the share of columns ``[i1, i2)``; the blocks' shares sum to total."""
    return total * i2 // cols - total * i1 // cols


def sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    amount: float | int | Tensor | None,
    *,
    n_m: tuple[int, int] | list[int] | str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune a Linear weight and update the rest to keep its outputs (OBS).

    A transcription of the reference ``fasterprune``: dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zeroed
    weight column; ``percdamp·mean(diag H)`` is added to the diagonal; ``Hinv`` is the upper Cholesky factor of
    ``H⁻¹``. Columns are processed in blocks of ``blocksize``; each pruned weight's error ``(w − q)/[Hinv]_cc`` is
    propagated to the later columns of its block, then to the remaining blocks (lazy batch update). Masks are
    chosen by ``w²/[Hinv]²_cc`` on the current (already updated) weights:

    * float / int ``amount``: per block, over all rows × block columns (as the reference). The reference prunes
      ``⌊fraction·rows·width⌋ + 1`` per block (``<=`` the threshold at that index, more with ties), so its total
      drifts; here the layer total ``T = round(fraction·numel)`` (or the int) is exact, the block ``[i1, i2)``
      pruning ``⌊T·i2/in⌋ − ⌊T·i1/in⌋``.
    * ``(out,)`` integer tensor ``amount`` (TRIM): row ``r`` prunes ``⌊k_r·i2/in⌋ − ⌊k_r·i1/in⌋`` of its lowest in
      block ``[i1, i2)``, so exactly ``k_r`` in all.
    * ``n_m=(N, M)``: at the first column of every group of ``M``, the ``N`` lowest of each row in the group
      (exactly ``N`` zeros per group); ``blocksize`` must be a multiple of ``M``.

    Ties go to the lower column (per block: the lower row-major index). ``H``'s scale is irrelevant (the damping
    is relative), so the token-count convention of :func:`hessian_from_sum` does not matter. ``H⁻¹`` and its
    Cholesky factor are computed in float64; the weights and the OBS updates run in float32 (as the reference).
    The inputs are not modified.

    Args:
        weight: ``(out, in)`` Linear weight (any float dtype).
        hessian: ``(in, in)`` ``(2/n) Σ x xᵀ`` (see :func:`hessian_from_sum`); moved to ``weight``'s device.
        amount: as in :func:`prune_mask` (None or ``N/M`` with ``n_m``).
        n_m: an N:M pattern (see :func:`check_nm`).
        blocksize: columns per block (the reference's 128).
        percdamp: dampening, a fraction of the mean Hessian diagonal.

    Returns:
        The updated weight (``weight``'s dtype, exact zeros where pruned) and the ``(out, in)`` bool keep mask.
        A dead input's column (never non-zero in the calibration data) is zeroed and marked pruned; it scores 0, so
        it counts against the budget first, and only a block (N:M group, TRIM row) with more dead columns than its
        budget ends up sparser than asked.

    Raises:
        ValueError: on bad shapes, ``amount``, ``n_m``, ``blocksize`` or ``percdamp``, or when the damped Hessian
            is not positive definite (raise ``percdamp``).
    """
    _check_2d(weight, "weight")
    rows, cols = weight.shape
    if not isinstance(hessian, Tensor) or hessian.shape != (cols, cols):
        shape = tuple(hessian.shape) if isinstance(hessian, Tensor) else type(hessian).__name__
        raise ValueError(
            f"`hessian` must be (in_features, in_features) = ({cols}, {cols}), got {shape} "
            f"for weight.shape={tuple(weight.shape)}"
        )
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"`blocksize` must be a positive int, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, int | float) or not 0 <= percdamp < math.inf:
        raise ValueError(f"`percdamp` must be a finite number >= 0, got {percdamp!r}")
    nm = check_nm(n_m)
    target = _resolve_amount(amount, rows, cols, nm)
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"`blocksize` must be a multiple of M={nm[1]} with `n_m`, got {blocksize}")

    W = weight.detach().to(dtype=torch.float32, copy=True)  # (out, in)
    H = hessian.detach().to(device=weight.device, dtype=torch.float64, copy=True)  # (in, in)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(f"The damped `hessian` is not positive definite (percdamp={percdamp}); raise `percdamp`")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # (in, in), upper
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (out, w)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (w, w)
        d1 = Hinv1.diagonal()  # (w,)
        if isinstance(target, Tensor):
            prune1 = _row_prune(W1**2 / d1**2, _block_counts(target, i1, i2, cols))  # type: ignore[arg-type]
        elif target is not None:
            prune1 = _global_prune(W1**2 / d1**2, int(_block_counts(target, i1, i2, cols)))
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                j = slice(i, i + nm[1])
                prune1[:, j] = _nm_prune(W1[:, j] ** 2 / d1[j] ** 2, *nm)
            w = W1[:, i]  # (out,)
            q = w.masked_fill(prune1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d1[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        keep[:, i1:i2] = ~prune1
    keep[:, dead] = False  # zeroed above: the mask says so (beyond the budget only if a block has more dead columns)
    return W.to(weight.dtype), keep


def hessian_update(xx_sum: Tensor | None, count: int, x: Tensor) -> tuple[Tensor, int]:
    """Add a batch of Linear inputs to the SparseGPT statistic, kept as the float64 sum ``Σ x xᵀ`` and a count.

    Sums, not a running mean: states from several ranks combine by all-reducing both ``xx_sum`` and ``count``
    with SUM; :func:`hessian_from_sum` then gives ``H``. ``xx_sum`` is updated in place (and returned) to avoid
    an ``(in, in)`` allocation per batch.

    Args:
        xx_sum: the ``(in, in)`` float64 sum so far, or None to start.
        count: the number of tokens (input vectors) in ``xx_sum`` so far.
        x: a batch of inputs ``(..., in)``; every leading index is one token.

    Returns:
        The new sum (on ``x``'s device) and count.

    Raises:
        ValueError: if ``x`` has no feature dimension, ``xx_sum``'s shape does not match it, or ``count < 0``.

    Example:
        >>> s, n = hessian_update(None, 0, torch.ones(2, 3, 4))
        >>> n, hessian_from_sum(s, n)[0, 0].item()
        (6, 2.0)
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"`x` must be a (..., in_features) tensor, got {x!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"`count` must be an int >= 0, got {count!r}")
    d = x.size(-1)
    if xx_sum is not None and xx_sum.shape != (d, d):
        raise ValueError(
            f"`xx_sum` must be (in_features, in_features) = ({d}, {d}) for x.shape={tuple(x.shape)}, "
            f"got {tuple(xx_sum.shape)}"
        )
    flat = x.detach().reshape(-1, d).double()  # (tokens, in)
    if xx_sum is None:
        xx_sum = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    xx_sum.addmm_(flat.T, flat)
    return xx_sum, count + flat.size(0)


def hessian_from_sum(xx_sum: Tensor, count: int) -> Tensor:
    """SparseGPT's ``H = (2/n) Σ x xᵀ`` (float64) from the (all-reduced) sum and token count.

    Raises:
        ValueError: if ``count`` is not a positive int.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be a positive int (tokens behind `xx_sum`), got {count!r}")
    return xx_sum.double() * (2.0 / count)


register_criterion(
    "magnitude",
    "sparse",
    magnitude_scores,
    description="|W|, ranked over the whole layer (no data)",
)
register_criterion(
    "wanda",
    "sparse",
    wanda_scores,
    needs=("input_sq",),
    description="Wanda: |W|·‖X_j‖₂, ranked per output row",
)
register_criterion(
    "sparsegpt",
    "sparse",
    sparsegpt,
    needs=("hessian",),
    description="SparseGPT: OBS mask selection and weight update from the Hessian of the inputs",
)

SPARSE_CRITERIA = registry.names("sparse")
"""The weight-level pruning methods of this module (read from the registry)."""
