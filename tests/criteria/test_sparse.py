"""Weight-level pruning: Wanda / magnitude masks, N:M, SparseGPT against a loop transcription, the Hessian sums."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lit_prune.criteria.sparse import (
    SPARSE_CRITERIA,
    check_nm,
    hessian_from_sum,
    hessian_update,
    magnitude_scores,
    prune_mask,
    sparsegpt,
    wanda_scores,
)

ROWS, COLS, BLOCK = 16, 32, 8


def weight_and_inputs(seed: int = 0, tokens: int = 256) -> tuple[Tensor, Tensor]:
    """A random weight and correlated inputs ``X (tokens, COLS)``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(ROWS, COLS, generator=g)
    mix = torch.eye(COLS) + 0.5 * torch.randn(COLS, COLS, generator=g)
    X = torch.randn(tokens, COLS, generator=g) @ mix * torch.rand(COLS, generator=g).add(0.2)
    return W, X


def hessian_of(X: Tensor) -> Tensor:
    xx_sum, count = hessian_update(None, 0, X)
    return hessian_from_sum(xx_sum, count)


def reference_row_keep(scores: Tensor, counts: list[int]) -> Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    for r, k in enumerate(counts):
        order = sorted(range(scores.size(1)), key=lambda c: (scores[r, c].item(), c))
        for c in order[:k]:
            keep[r, c] = False
    return keep


def reference_sparsegpt(
    W: Tensor, H: Tensor, sparsity: float = 0.0, prune_n: int = 0, prune_m: int = 0, blocksize: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """The paper's algorithm in float64 with explicit loops, errors propagated at once (no lazy batching)."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    for i in range(cols):
        if H[i, i] == 0:
            H[i, i] = 1
            W[:, i] = 0
    damp = 0.01 * sum(H[i, i].item() for i in range(cols)) / cols
    for i in range(cols):
        H[i, i] += damp
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    total = round(sparsity * rows * cols)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if prune_n == 0:
            n_block = total * i2 // cols - total * i1 // cols
            cand = sorted(((W[r, c] / Hinv[c, c]) ** 2, r, c) for r in range(rows) for c in range(i1, i2))
            for _, r, c in cand[:n_block]:
                pruned[r, c] = True
        for c in range(i1, i2):
            if prune_n and (c - i1) % prune_m == 0:
                for r in range(rows):
                    group = sorted(range(c, c + prune_m), key=lambda j: ((W[r, j] / Hinv[j, j]) ** 2, j))
                    for j in group[:prune_n]:
                        pruned[r, j] = True
            err = torch.where(pruned[:, c], W[:, c], torch.zeros(rows, dtype=W.dtype)) / Hinv[c, c]
            for j in range(c, cols):
                W[:, j] -= err * Hinv[c, j]
            W[pruned[:, c], c] = 0.0
    return W, ~pruned


def test_sparse_criteria_names() -> None:
    assert SPARSE_CRITERIA == ("magnitude", "wanda", "sparsegpt")


def test_check_nm_accepts_the_three_forms() -> None:
    assert check_nm(None) is None
    assert check_nm((2, 4)) == check_nm([2, 4]) == check_nm("2:4") == check_nm(" 2 : 4 ") == (2, 4)


def test_wanda_mask_matches_a_per_row_loop() -> None:
    W, X = weight_and_inputs()
    input_sq = X.double().pow(2).sum(0)
    scores = wanda_scores(W, input_sq)
    torch.testing.assert_close(scores, W.abs() * X.norm(dim=0), rtol=1e-5, atol=0)
    assert scores.dtype == torch.float32
    assert torch.equal(prune_mask(scores, 0.5), reference_row_keep(scores, [COLS // 2] * ROWS))
    counts = torch.randint(0, COLS + 1, (ROWS,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(prune_mask(scores, counts), reference_row_keep(scores, counts.tolist()))


def test_fraction_and_int_amounts_are_exact_and_spread_over_the_first_rows() -> None:
    W, X = weight_and_inputs()
    scores = wanda_scores(W, X.pow(2).sum(0))
    total = round(0.3 * ROWS * COLS)  # 153.6 -> 154 = 9 per row, the first 10 rows one more
    expected = reference_row_keep(scores, [10] * 10 + [9] * 6)
    assert torch.equal(prune_mask(scores, 0.3), expected)
    assert torch.equal(prune_mask(scores, total), expected)
    assert int((~prune_mask(scores, 0.3, per_row=False)).sum()) == total
    assert prune_mask(scores, 0.0).all() and not prune_mask(scores, ROWS * COLS).any()


def test_magnitude_per_layer_matches_a_global_threshold() -> None:
    W, _ = weight_and_inputs()
    scores = magnitude_scores(W.to(torch.bfloat16))
    assert scores.dtype == torch.float32
    scores = magnitude_scores(W)
    k = round(0.4 * W.numel())
    threshold = scores.flatten().sort().values[k - 1]
    assert torch.equal(prune_mask(scores, 0.4, per_row=False), scores > threshold)


def test_ties_prune_the_lower_column_first() -> None:
    scores = torch.ones(2, 4)
    assert prune_mask(scores, 0.5).tolist() == [[False, False, True, True]] * 2
    assert prune_mask(scores, 3, per_row=False).tolist() == [[False, False, False, True], [True] * 4]
    assert prune_mask(scores, None, n_m="1:2").tolist() == [[False, True, False, True]] * 2


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_n_m_prunes_the_n_lowest_of_every_group(n: int, m: int) -> None:
    scores = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(m))
    keep = prune_mask(scores, n / m, n_m=(n, m))
    groups, kept = scores.view(ROWS, -1, m), keep.view(ROWS, -1, m)
    assert ((~kept).sum(2) == n).all()
    pruned_max = groups.masked_fill(kept, -torch.inf).amax(2)
    kept_min = groups.masked_fill(~kept, torch.inf).amin(2)
    assert (pruned_max < kept_min).all()
    assert torch.equal(prune_mask(scores, None, n_m=f"{n}:{m}"), keep)


@pytest.mark.parametrize(("sparsity", "n_m"), [(0.5, None), (0.3, None), (None, (2, 4))])
def test_sparsegpt_matches_the_loop_transcription(sparsity: float | None, n_m: tuple[int, int] | None) -> None:
    W, X = weight_and_inputs()
    H = hessian_of(X)
    new, keep = sparsegpt(W, H, sparsity, n_m=n_m, blocksize=BLOCK)
    prune_n, prune_m = n_m or (0, 0)
    ref_new, ref_keep = reference_sparsegpt(W, H, sparsity or 0.0, prune_n, prune_m)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_new, rtol=1e-4, atol=1e-4)
    assert new.dtype == W.dtype and (new[~keep] == 0).all()
    if n_m is None:
        assert int((~keep).sum()) == round(sparsity * W.numel())  # type: ignore[operator]
    else:
        assert ((~keep).view(ROWS, -1, 4).sum(2) == 2).all()


def test_sparsegpt_per_row_counts_are_exact_per_row_and_per_block() -> None:
    W, X = weight_and_inputs(seed=1)
    counts = torch.randint(0, COLS + 1, (ROWS,), generator=torch.Generator().manual_seed(5))
    new, keep = sparsegpt(W.to(torch.bfloat16), hessian_of(X), counts, blocksize=BLOCK)
    assert new.dtype == torch.bfloat16 and (new[~keep] == 0).all()
    assert torch.equal((~keep).sum(1), counts)
    for i1 in range(0, COLS, BLOCK):
        expected = counts * (i1 + BLOCK) // COLS - counts * i1 // COLS
        assert torch.equal((~keep[:, i1 : i1 + BLOCK]).sum(1), expected)


def test_obs_update_lowers_the_reconstruction_error() -> None:
    W, X = weight_and_inputs(seed=2)
    new, keep = sparsegpt(W, hessian_of(X), 0.5, blocksize=BLOCK)
    masked_only = W * keep
    assert (X @ (W - new).T).norm() < 0.8 * (X @ (W - masked_only).T).norm()
    # with H = I no correlation to exploit: the update is a no-op and the mask is per-block magnitude
    same, keep_eye = sparsegpt(W, torch.eye(COLS), 0.5, blocksize=COLS)
    assert torch.equal(keep_eye, prune_mask(W.abs(), 0.5, per_row=False))
    torch.testing.assert_close(same, W * keep_eye)


def test_sparsegpt_dead_inputs() -> None:
    W, X = weight_and_inputs(seed=3)
    X[:, [3, 17]] = 0
    H = hessian_of(X)
    H_before = H.clone()
    new, keep = sparsegpt(W, H, 0.25, blocksize=BLOCK)
    assert torch.isfinite(new).all() and (new[:, [3, 17]] == 0).all()
    assert not keep[:, [3, 17]].any()  # score 0: pruned first
    assert torch.equal(H, H_before)
    ref_new, ref_keep = reference_sparsegpt(W, H, 0.25)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new.double(), ref_new, rtol=1e-4, atol=1e-4)


def test_hessian_sums_combine_across_batches_and_ranks() -> None:
    _, X = weight_and_inputs(tokens=24)
    x = X.view(2, 3, 4, COLS)
    xx_sum, count = None, 0
    for batch in x:
        xx_sum, count = hessian_update(xx_sum, count, batch)
    assert count == 24 and xx_sum is not None and xx_sum.dtype == torch.float64
    rank0, n0 = hessian_update(None, 0, X[:10])
    rank1, n1 = hessian_update(None, 0, X[10:])
    expected = 2 / 24 * X.double().T @ X.double()
    torch.testing.assert_close(hessian_from_sum(xx_sum, count), expected)
    torch.testing.assert_close(hessian_from_sum(rank0 + rank1, n0 + n1), expected)


def test_sparse_misconfiguration() -> None:
    scores = torch.rand(4, 8)
    for bad in ("4:2", (0, 4), (2, 4, 8), "a:b", [2.0, 4], (True, 4), 2):
        with pytest.raises(ValueError, match=r"`n_m` must be None, \(N, M\), \[N, M\] or 'N:M'.* got"):
            check_nm(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`weight` must be a 2-D .* got \(8,\)"):
        magnitude_scores(torch.rand(8))
    with pytest.raises(ValueError, match=r"`input_sq` must have shape .* \(8,\), got \(4,\) for weight.shape=\(4, 8\)"):
        wanda_scores(scores, torch.rand(4))
    with pytest.raises(ValueError, match=r"`input_sq` must be sums of squares"):
        wanda_scores(scores, -torch.ones(8))
    with pytest.raises(ValueError, match="`scores` holds NaN"):
        prune_mask(torch.full((4, 8), torch.nan), 0.5)
    for bad_amount in (1.0, -0.1, 33, -1, True, None, "0.5"):
        with pytest.raises(ValueError, match=r"`amount` must be a float in \[0, 1\), an int in \[0, 32\]"):
            prune_mask(scores, bad_amount)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tensor `amount` must be 1-D integer .* \(4,\), got shape \(3,\)"):
        prune_mask(scores, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="got shape .* and dtype torch.float32"):
        prune_mask(scores, torch.ones(4))
    with pytest.raises(ValueError, match=r"Per-row `amount` counts must be ints in \[0, 8\], got \[0, 9, 1, 1\]"):
        prune_mask(scores, torch.tensor([0, 9, 1, 1]))
    with pytest.raises(ValueError, match=r"With `n_m`=2:4, `amount` must be None or 0.5, got 0.6"):
        prune_mask(scores, 0.6, n_m="2:4")
    with pytest.raises(ValueError, match="N:M 2:3 needs in_features divisible by 3, got 8"):
        prune_mask(scores, None, n_m=(2, 3))
    with pytest.raises(ValueError, match=r"`hessian` must be \(in_features, in_features\) = \(8, 8\), got \(4, 4\)"):
        sparsegpt(scores, torch.eye(4), 0.5)
    for blocksize in (0, 2.0):
        with pytest.raises(ValueError, match="`blocksize` must be a positive int"):
            sparsegpt(scores, torch.eye(8), 0.5, blocksize=blocksize)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`percdamp` must be a finite number >= 0, got -0.1"):
        sparsegpt(scores, torch.eye(8), 0.5, percdamp=-0.1)
    with pytest.raises(ValueError, match="`blocksize` must be a multiple of M=4 with `n_m`, got 6"):
        sparsegpt(scores, torch.eye(8), None, n_m="2:4", blocksize=6)
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt(scores, torch.diag(torch.tensor([1.0, -1.0] * 4)), 0.5, percdamp=0.0)
    with pytest.raises(ValueError, match=r"`xx_sum` must be .* \(8, 8\) for x.shape=\(2, 8\), got \(4, 4\)"):
        hessian_update(torch.zeros(4, 4), 0, torch.rand(2, 8))
    with pytest.raises(ValueError, match="`count` must be an int >= 0, got -1"):
        hessian_update(None, -1, torch.rand(2, 8))
    with pytest.raises(ValueError, match=r"`x` must be a \(\.\.\., in_features\) tensor"):
        hessian_update(None, 0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="`count` must be a positive int"):
        hessian_from_sum(torch.zeros(8, 8), 0)
