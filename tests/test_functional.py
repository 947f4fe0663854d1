"""lit_prune.functional.perplexity: next-token NLL against a reference, labels for padded batches, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from lit_prune.functional.perplexity import IGNORE_INDEX, labels_for, next_token_nll, perplexity_from_nll


def test_next_token_nll_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[1, 3] = IGNORE_INDEX
    sum_nll, count = next_token_nll(logits, labels)
    logp = torch.log_softmax(logits.double(), dim=-1)
    expected = -sum(float(logp[b, t, labels[b, t + 1]]) for b in range(2) for t in range(4) if (b, t + 1) != (1, 3))
    assert int(count) == 7
    assert sum_nll.dtype == torch.float64
    assert float(sum_nll) == pytest.approx(expected, rel=1e-5)
    assert float(perplexity_from_nll(sum_nll, count)) == pytest.approx(math.exp(expected / 7), rel=1e-5)


def test_labels_for_ignores_padding() -> None:
    ids = torch.tensor([[5, 6, 7], [8, 9, 4]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert labels_for(ids) is ids
    assert labels_for(ids, labels=ids.flip(0), attention_mask=mask).equal(ids.flip(0))  # given labels win
    assert labels_for(ids, attention_mask=mask).tolist() == [[5, 6, 7], [8, 9, IGNORE_INDEX]]


def test_next_token_nll_misconfiguration() -> None:
    with pytest.raises(ValueError, match=r"`logits` must be \(batch, seq_len, vocab\), got shape \(2, 5\)"):
        next_token_nll(torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`labels` must be \(batch, seq_len\) = \(2, 5\), got \(2, 4\)"):
        next_token_nll(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


def test_perplexity_from_nll_is_nan_when_nothing_was_scored() -> None:
    ppl = perplexity_from_nll(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0))
    assert ppl.dtype == torch.float64
    assert math.isnan(float(ppl))
