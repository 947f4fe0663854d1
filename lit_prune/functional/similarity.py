"""One formula each for comparing two representations: KL, cosine, masked sums and linear CKA.

Pure tensor functions, shared by the statistics (:mod:`lit_prune.stats.depth`, :mod:`lit_prune.stats.candidates`),
the depth criteria, CKA-LoRA, MoP's proxies and the distillation loss:

* per position: :func:`token_kl` (``KL(p ‖ q)`` of next-token distributions), :func:`token_cosine`;
* over non-pad positions: :func:`masked_sum`, :func:`masked_count` (``torch.where``, so padded positions may hold
  NaN or inf without touching the result);
* linear CKA in two exact forms: :func:`cka_from_sums` (``d × d``, from streamed sums) and :func:`cka_from_rows`
  (``n × n``, from kept rows), with one constant-feature rule (:data:`CONSTANT_RTOL`); :func:`cka_form` picks the
  cheaper one for ``n`` samples of width ``d`` and :func:`linear_cka` applies that choice to rows.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

_F64 = torch.float64

CONSTANT_RTOL = 1e-10
"""A centred Gram matrix counts as zero (constant features) below this fraction of the uncentred one's norm."""

CKAForm = Literal["sums", "rows"]
"""How linear CKA is collected: ``"sums"`` (``d × d`` Gram sums, ``O(d²)`` memory) or ``"rows"`` (``O(n d)``)."""

CKA_FORMS: tuple[CKAForm, ...] = ("sums", "rows")
"""Every :data:`CKAForm`."""


def token_kl(ref_logp: Tensor, logits: Tensor, ref_p: Tensor | None = None) -> Tensor:
    """``KL(p ‖ q)`` at every position, ``q = softmax(logits)``: ``Σ_v p_v (log p_v - log q_v)``.

    Args:
        ref_logp: ``(..., V)`` log-probabilities of the reference ``p`` (computed in float32; float16 is upcast).
        logits: ``(..., V)`` logits of ``q``, log-softmaxed in float32.
        ref_p: ``(..., V)`` float32 ``exp(ref_logp)`` when the caller already has it (e.g. reused for every
            candidate); None: computed here.

    Returns:
        ``(...)`` float32 nats, differentiable in ``logits``.

    Raises:
        ValueError: if the shapes differ.

    Example:
        >>> logits = torch.tensor([[0.0, 1.0, 2.0]])
        >>> token_kl(torch.log_softmax(logits, -1), logits).abs().item() < 1e-6
        True
    """
    if ref_logp.shape != logits.shape or (ref_p is not None and ref_p.shape != logits.shape):
        shapes = [None if t is None else tuple(t.shape) for t in (ref_logp, logits, ref_p)]
        raise ValueError(f"`ref_logp`, `logits` (and `ref_p`) must have one shape (..., vocab), got {shapes}")
    ref_logp = ref_logp.float()
    logq = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    p = ref_logp.exp() if ref_p is None else ref_p
    return (p * (ref_logp - logq)).sum(-1)


def token_cosine(a: Tensor, b: Tensor) -> Tensor:
    """``cos(a_t, b_t)`` at every position, computed in float32.

    Args:
        a: ``(..., d)``, e.g. ``(B, T, d)`` hidden states.
        b: ``(..., d)`` of the same shape.

    Returns:
        ``(...)`` float32.

    Raises:
        ValueError: if the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape (..., d), got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def _check_values_mask(values: Tensor, mask: Tensor | None) -> None:
    if mask is not None and tuple(mask.shape) != tuple(values.shape):
        shapes = f"{tuple(values.shape)} (1 = token, 0 = pad), got {tuple(mask.shape)}"
        raise ValueError(f"`mask` must have the shape of `values` {shapes}")


def masked_sum(values: Tensor, mask: Tensor | None) -> Tensor:
    """Σ of ``values`` where ``mask`` is nonzero, accumulated in float64.

    Padded positions are dropped with ``torch.where``, not multiplied by 0, so a NaN or inf there cannot leak in.

    Args:
        values: ``(B, T)`` (any shape) per-position values, e.g. from :func:`token_kl` or :func:`token_cosine`.
        mask: ``values``-shaped, 1 (or True) on tokens and 0 on padding; None: every position counts.

    Returns:
        ``()`` float64 on ``values``' device.

    Raises:
        ValueError: if ``mask`` has another shape.

    Example:
        >>> masked_sum(torch.tensor([[1.0, float("nan")]]), torch.tensor([[1, 0]]))
        tensor(1., dtype=torch.float64)
    """
    _check_values_mask(values, mask)
    if mask is not None:
        values = torch.where(mask.to(device=values.device, dtype=torch.bool), values, 0.0)
    return values.sum(dtype=_F64)


def masked_count(values: Tensor, mask: Tensor | None) -> Tensor:
    """The number of positions :func:`masked_sum` adds up.

    Args:
        values: the per-position values (only their shape is read).
        mask: as for :func:`masked_sum`.

    Returns:
        ``()`` float64 on ``values``' device.

    Raises:
        ValueError: if ``mask`` has another shape.
    """
    _check_values_mask(values, mask)
    if mask is None:
        return torch.tensor(float(values.numel()), dtype=_F64, device=values.device)
    return mask.to(device=values.device, dtype=torch.bool).sum(dtype=_F64)


def _constant_cka(value: Tensor, const_x: Tensor, const_y: Tensor) -> Tensor:
    """Apply the constant-feature rule: CKA 1 when both sides are constant, 0 when one is; clamp to ``[0, 1]``."""
    degenerate = torch.where(const_x & const_y, 1.0, 0.0).to(_F64)
    return torch.where(const_x | const_y, degenerate, value).clamp(0.0, 1.0)


def cka_from_sums(gram_x: Tensor, gram_y: Tensor, cross: Tensor, sum_x: Tensor, sum_y: Tensor, count: Tensor) -> Tensor:
    """Linear CKA from streamed sums (the ``d × d`` form), batched over leading dimensions, in float64.

    ``X̃ᵀỸ = XᵀY - (Σx)(Σy)ᵀ / n``; ``CKA = ‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)``. Constant features (a centred Gram
    below :data:`CONSTANT_RTOL` of the uncentred one's norm): CKA 1 when both sides are constant, else 0.

    Args:
        gram_x: ``(..., d_x, d_x)`` ``Σ x xᵀ``.
        gram_y: ``(..., d_y, d_y)`` ``Σ y yᵀ``.
        cross: ``(..., d_x, d_y)`` ``Σ x yᵀ``.
        sum_x: ``(..., d_x)`` ``Σ x``.
        sum_y: ``(..., d_y)`` ``Σ y``.
        count: ``(...)`` rows ``n`` behind the sums.

    Returns:
        ``(...)`` float64 CKA in ``[0, 1]``.

    Raises:
        ValueError: if a count is not positive.
    """
    gram_x, gram_y, cross, sum_x, sum_y, count = (t.to(_F64) for t in (gram_x, gram_y, cross, sum_x, sum_y, count))
    if bool((count <= 0).any()):
        raise ValueError(f"No calibration rows behind the CKA sums (count {count.tolist()})")
    n = count[..., None, None]
    centred_x = gram_x - sum_x[..., :, None] * sum_x[..., None, :] / n  # (..., d_x, d_x)
    centred_y = gram_y - sum_y[..., :, None] * sum_y[..., None, :] / n  # (..., d_y, d_y)
    centred_xy = cross - sum_x[..., :, None] * sum_y[..., None, :] / n  # (..., d_x, d_y)
    norm_x = torch.linalg.matrix_norm(centred_x)  # (...)
    norm_y = torch.linalg.matrix_norm(centred_y)
    const_x = norm_x <= CONSTANT_RTOL * torch.linalg.matrix_norm(gram_x)
    const_y = norm_y <= CONSTANT_RTOL * torch.linalg.matrix_norm(gram_y)
    value = centred_xy.pow(2).sum((-2, -1)) / (norm_x * norm_y)
    return _constant_cka(value, const_x, const_y)


def _check_rows(x: Tensor, y: Tensor) -> None:
    """Raise unless ``x`` and ``y`` are ``(..., n, d)`` rows of the same ``n >= 1`` samples."""
    if x.dim() < 2 or x.shape[:-1] != y.shape[:-1] or x.size(-2) < 1:
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ValueError(f"`x` and `y` must be (..., n, d) rows of the same n >= 1 samples, got {shapes}")


def cka_from_rows(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of two representations of the same ``n`` samples from ``n × n`` Gram matrices, in float64.

    ``CKA = ⟨K, L⟩_F / (‖K‖_F ‖L‖_F)`` with ``K = X̃X̃ᵀ`` and ``L = ỸỸᵀ`` of the column-centred rows, equal to the
    ``d × d`` form of :func:`cka_from_sums`; the same constant-feature rule applies (``‖X̃X̃ᵀ‖ = ‖X̃ᵀX̃‖``).

    Args:
        x: ``(..., n, d_x)`` rows.
        y: ``(..., n, d_y)`` rows of the same samples, in the same order.

    Returns:
        ``(...)`` float64 CKA in ``[0, 1]``.

    Raises:
        ValueError: if an input is not at least 2-D, the leading dimensions or ``n`` differ, or ``n`` is 0.

    Example:
        >>> x = torch.randn(8, 3, dtype=torch.float64)
        >>> round(cka_from_rows(x, 2 * x + 1).item(), 9)
        1.0
    """
    _check_rows(x, y)
    x, y = x.to(_F64), y.to(_F64)
    xc, yc = x - x.mean(-2, keepdim=True), y - y.mean(-2, keepdim=True)
    k, l_ = xc @ xc.mT, yc @ yc.mT  # (..., n, n)
    k_norm, l_norm = torch.linalg.matrix_norm(k), torch.linalg.matrix_norm(l_)  # (...)
    const_x = k_norm <= CONSTANT_RTOL * torch.linalg.matrix_norm(x @ x.mT)
    const_y = l_norm <= CONSTANT_RTOL * torch.linalg.matrix_norm(y @ y.mT)
    value = (k * l_).sum((-2, -1)) / (k_norm * l_norm)
    return _constant_cka(value, const_x, const_y)


def cka_form(num_samples: int, width: int) -> CKAForm:
    """The cheaper exact form of linear CKA for ``num_samples`` rows of width ``width``.

    ``"rows"`` (``n × n`` Grams of kept rows, ``O(n d)`` memory) when ``n < d``, else ``"sums"`` (``d × d`` Gram
    sums, ``O(d²)`` memory, independent of ``n``).

    Args:
        num_samples: ``n``, the rows CKA compares.
        width: ``d``, the feature width.

    Returns:
        ``"rows"`` or ``"sums"``.

    Raises:
        ValueError: if either is not a positive int.

    Example:
        >>> cka_form(128, 4096), cka_form(8192, 4096)
        ('rows', 'sums')
    """
    for name, value in (("num_samples", num_samples), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return "rows" if num_samples < width else "sums"


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of ``(..., n, d)`` rows by the form :func:`cka_form` picks (the results agree up to rounding).

    Args:
        x: ``(..., n, d_x)`` rows.
        y: ``(..., n, d_y)`` rows of the same samples.

    Returns:
        ``(...)`` float64 CKA in ``[0, 1]``.

    Raises:
        ValueError: as for :func:`cka_from_rows`.
    """
    _check_rows(x, y)
    if cka_form(x.size(-2), max(x.size(-1), y.size(-1))) == "rows":
        return cka_from_rows(x, y)
    x, y = x.to(_F64), y.to(_F64)
    count = torch.full(x.shape[:-2], float(x.size(-2)), dtype=_F64, device=x.device)
    return cka_from_sums(x.mT @ x, y.mT @ y, x.mT @ y, x.sum(-2), y.sum(-2), count)
