"""The shared formulas: KL, cosine and masked sums against plain references; the two CKA forms agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lit_prune.functional import similarity
from lit_prune.functional.similarity import (
    CONSTANT_RTOL,
    cka_form,
    cka_from_rows,
    cka_from_sums,
    linear_cka,
    masked_count,
    masked_sum,
    token_cosine,
    token_kl,
)

F64 = torch.float64


def _sums(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """The streamed sums of two ``(..., n, d)`` row sets, as the statistics accumulate them."""
    x, y = x.to(F64), y.to(F64)
    count = torch.full(x.shape[:-2], float(x.size(-2)), dtype=F64)
    return x.mT @ x, y.mT @ y, x.mT @ y, x.sum(-2), y.sum(-2), count


def _reference_cka(x: Tensor, y: Tensor) -> float:
    """Kornblith et al. 2019, feature-space form, float64."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def _pair(n: int, d: int, seed: int = 0, noise: float = 0.5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = x @ torch.randn(d, d, generator=g, dtype=F64) + noise * torch.randn(n, d, generator=g, dtype=F64)
    return x, y


@pytest.mark.parametrize(("n", "d"), [(6, 20), (20, 6), (16, 16)])
def test_cka_sums_and_rows_forms_agree_with_the_reference(n: int, d: int) -> None:
    x, y = _pair(n, d)
    rows = cka_from_rows(x, y)
    sums = cka_from_sums(*_sums(x, y))
    assert rows.dtype == sums.dtype == F64 and rows.shape == sums.shape == ()
    assert float(rows) == pytest.approx(_reference_cka(x, y), rel=1e-9)
    assert float(sums) == pytest.approx(_reference_cka(x, y), rel=1e-9)
    assert float(linear_cka(x, y)) == pytest.approx(_reference_cka(x, y), rel=1e-9)


def test_cka_forms_are_batched_over_leading_dimensions_and_allow_two_widths() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 10, 7, generator=g, dtype=F64)  # (L, n, d_x)
    y = torch.randn(4, 10, 5, generator=g, dtype=F64)  # (L, n, d_y)
    y[1] = x[1, :, :5] * 2 + 1
    rows, sums = cka_from_rows(x, y), cka_from_sums(*_sums(x, y))
    assert rows.shape == sums.shape == (4,)
    torch.testing.assert_close(rows, sums, rtol=1e-9, atol=0)
    expected = torch.tensor([_reference_cka(x[i], y[i]) for i in range(4)], dtype=F64)
    torch.testing.assert_close(rows, expected, rtol=1e-9, atol=0)


def test_cka_of_identical_scaled_and_shifted_inputs_is_one() -> None:
    x, _ = _pair(12, 8)
    for y in (x, 3 * x + 1, -x):
        assert float(cka_from_rows(x, y)) == pytest.approx(1.0, abs=1e-12)
        assert float(cka_from_sums(*_sums(x, y))) == pytest.approx(1.0, abs=1e-12)
    assert float(cka_from_rows(x, x)) <= 1.0 and float(cka_from_sums(*_sums(x, x))) <= 1.0  # clamped


def test_constant_features_follow_one_rule_in_both_forms() -> None:
    x, _ = _pair(6, 3)
    const = torch.ones(6, 3, dtype=F64)
    assert CONSTANT_RTOL == 1e-10
    nearly = const + 1e-12 * x  # centred Gram ~1e-24 of the uncentred one, far below CONSTANT_RTOL: constant
    for a, b, expected in ((const, 2 * const, 1.0), (x, const, 0.0), (const, x, 0.0), (nearly, const, 1.0)):
        assert cka_from_rows(a, b).item() == expected
        assert cka_from_sums(*_sums(a, b)).item() == expected
        assert linear_cka(a, b).item() == expected
    one_row = cka_from_rows(x[:1], x[:1] + 1)  # a single sample: nothing varies, both sides constant
    assert one_row.item() == cka_from_sums(*_sums(x[:1], x[:1] + 1)).item() == 1.0


def test_cka_misconfiguration() -> None:
    x, y = _pair(5, 3)
    with pytest.raises(ValueError, match=r"rows of the same n >= 1 samples, got \(5, 3\) and \(4, 3\)"):
        cka_from_rows(x, y[:4])
    with pytest.raises(ValueError, match=r"rows of the same n >= 1 samples, got \(3,\) and \(3,\)"):
        linear_cka(x[0], y[0])
    with pytest.raises(ValueError, match=r"rows of the same n >= 1 samples, got \(0, 3\) and \(0, 3\)"):
        cka_from_rows(x[:0], y[:0])
    with pytest.raises(ValueError, match=r"No calibration rows behind the CKA sums \(count \[0.0\]\)"):
        cka_from_sums(*_sums(x[None, :0], y[None, :0]))
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=f"`num_samples` must be an int >= 1, got {bad!r}"):
            cka_form(bad, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`width` must be an int >= 1, got 0"):
        cka_form(8, 0)


def test_cka_form_keeps_rows_only_below_the_width() -> None:
    assert cka_form(128, 4096) == "rows"
    assert cka_form(4096, 4096) == "sums"
    assert cka_form(1, 1) == "sums"
    assert similarity.CKA_FORMS == ("sums", "rows")


def test_token_kl_equals_the_definition_and_is_zero_for_equal_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    ref_logits = torch.randn(2, 5, 11, generator=g)
    logits = torch.randn(2, 5, 11, generator=g)
    ref_logp = torch.log_softmax(ref_logits, -1)
    kl = token_kl(ref_logp, logits)
    assert kl.shape == (2, 5) and kl.dtype == torch.float32
    expected = F.kl_div(torch.log_softmax(logits, -1), ref_logp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(token_kl(ref_logp, logits, ref_p=ref_logp.exp()), kl, rtol=0, atol=0)
    assert bool((kl > 0).all())
    assert token_kl(ref_logp, ref_logits).abs().max() < 1e-5
    # a float16 reference (MoP keeps the dense log-probs in float16) is upcast, logits of any float dtype too
    half = token_kl(ref_logp.half(), logits.double())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, kl, atol=1e-2, rtol=1e-2)


def test_token_kl_is_differentiable_in_the_logits_only() -> None:
    ref_logp = torch.log_softmax(torch.randn(3, 7), -1).requires_grad_(False)
    logits = torch.randn(3, 7, requires_grad=True)
    token_kl(ref_logp, logits).sum().backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, torch.softmax(logits, -1).detach() - ref_logp.exp())


def test_token_cosine_equals_torch_in_float32() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 4, 6, generator=g, dtype=torch.bfloat16)
    b = torch.randn(2, 4, 6, generator=g, dtype=torch.bfloat16)
    cos = token_cosine(a, b)
    assert cos.shape == (2, 4) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, F.cosine_similarity(a.float(), b.float(), dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(token_cosine(a, a), torch.ones(2, 4), atol=1e-6, rtol=0)


def test_masked_sum_and_count_skip_padding_even_when_it_holds_nan() -> None:
    values = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 4.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    total = masked_sum(values, mask)
    assert total.dtype == F64 and total.shape == () and total.item() == 15.0
    assert masked_sum(values, mask.bool()).item() == 15.0
    assert masked_count(values, mask).item() == 4.0 and masked_count(values, mask).dtype == F64
    assert masked_count(values, None).item() == 6.0
    clean = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    assert masked_sum(clean, None).item() == clean.sum(dtype=F64).item()
    assert masked_sum(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_kl_and_cosine_with_nan_in_padded_positions() -> None:
    """Padded positions of real batches may hold garbage; the per-token formulas plus masked_sum drop them."""
    g = torch.Generator().manual_seed(4)
    ref = torch.randn(2, 4, 5, generator=g)
    hidden = torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
    hidden[0, 3] = float("nan")
    hidden[1, 0] = float("nan")
    cos = token_cosine(ref, hidden)
    kl = token_kl(torch.log_softmax(ref, -1), hidden)
    assert bool(cos.isnan().any()) and bool(kl.isnan().any())
    keep = mask.bool()
    assert masked_sum(cos, mask).item() == pytest.approx(float(cos[keep].double().sum()), rel=1e-12)
    assert masked_sum(kl, mask).item() == pytest.approx(float(kl[keep].double().sum()), rel=1e-12)
    assert masked_count(cos, mask).item() == 6.0


def test_shape_misconfiguration() -> None:
    with pytest.raises(
        ValueError, match=r"`a` and `b` must have the same shape \(\.\.\., d\), got \(2, 3\) and \(2, 4\)"
    ):
        token_cosine(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must have one shape \(\.\.\., vocab\), got \[\(2, 3\), \(2, 4\), None\]"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"got \[\(2, 3\), \(2, 3\), \(2, 4\)\]"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 3), ref_p=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `values` \(2, 3\) .*got \(2, 4\)"):
        masked_sum(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `values` \(2, 3\) .*got \(3,\)"):
        masked_count(torch.zeros(2, 3), torch.ones(3))
