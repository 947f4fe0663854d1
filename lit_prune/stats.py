"""Streaming statistics for depth pruning, gathered by forward hooks in one calibration pass.

Two torchmetrics ``Metric`` s hold sufficient statistics (sums, Gram matrices, counts), all float64 and reduced
with ``dist_reduce_fx="sum"``, so ranks that saw different batches reduce to the same numbers and memory does not
depend on the number of calibration tokens:

* :class:`DepthStatistics`: per block, the block's input and output (Block Influence, angular distance, linear
  CKA), filled by :func:`collect_depth_statistics` from hooks on every block during one decoder forward per batch.
* :class:`GlobalStatistics`: per candidate block, the original model's final representation and next-token
  distribution against those of the model with that block skipped, filled by :func:`collect_global_statistics`.

Boundaries are numbered ``h_0 .. h_L``: ``h_i`` enters block ``i`` and ``h_L`` leaves the last block (before the
final norm). The output of block ``i`` is taken to be the input of block ``i + 1`` (true for every adapter family).
The criteria that turn these sums into scores live in :mod:`lit_prune.criteria.depth`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric
from tqdm.auto import tqdm

from lit_prune._validation import check_int
from lit_prune.arch import adapter_for
from lit_prune.eval._common import evaluating

log = logging.getLogger(__name__)

DEPTH_NEEDS = ("angular", "bi", "cka_all", "cka_last")
"""What a :class:`DepthStatistics` can collect."""

GLOBAL_METRICS = ("cka", "cosine", "kl")
"""What a :class:`GlobalStatistics` can collect."""

Batch = Tensor | Mapping[str, Tensor]
Batches = Tensor | Iterable[Batch]

_F64 = torch.float64


class _ReadOnly:
    """Base of the reduced-sums containers: attributes are set once in ``__init__``.

    They are plain classes, not dataclasses, on purpose: torchmetrics post-processes what ``compute()`` returns
    with ``apply_to_collection``, which rejects frozen dataclasses and squeezes one-element tensors (a 1-block
    model's ``(1,)`` sums would lose their dimension).
    """

    __slots__: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only (tried to set `{name}`)")

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        parts = []
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = {key: tuple(item.shape) for key, item in value.items()}
            parts.append(f"{name}={tuple(value.shape) if isinstance(value, Tensor) else value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class CKASums:
    """Linear-CKA sufficient statistics of the boundaries ``h_0 .. h_L`` over ``count`` rows (float64).

    Args:
        gram: ``(L+1, d, d)``, ``Σ h_i h_iᵀ`` per boundary.
        cross: ``(L, d, d)``, ``Σ h_i h_{i+1}ᵀ`` per block.
        colsum: ``(L+1, d)``, ``Σ h_i`` per boundary.
        count: ``(L,)``, rows (samples or tokens) seen by each block.
    """

    gram: Tensor
    cross: Tensor
    colsum: Tensor
    count: Tensor

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}={tuple(getattr(self, name).shape)}" for name in ("gram", "cross", "colsum", "count")
        )
        return f"CKASums({shapes})"


class DepthStats(_ReadOnly):
    """The reduced sums of a :class:`DepthStatistics` (what the depth criteria read). Absent needs are None.

    Args:
        num_blocks: ``L``.
        hidden_size: ``d``.
        bi_sum: ``(L,)``, Σ over non-pad tokens of ``cos(h_i, h_{i+1})``.
        bi_count: ``(L,)``, the tokens behind ``bi_sum``.
        angular_sum: ``(L+1, L+1)``, entry ``[i, j]`` (``i < j``): Σ over samples of ``arccos(cos(h_i, h_j)) / π``
            at the last non-pad token; zero on and below the diagonal.
        angular_count: ``(L+1, L+1)``, the samples behind each entry of ``angular_sum``.
        cka_last: CKA sums over the last non-pad token of each sample.
        cka_all: CKA sums over every non-pad token.
    """

    __slots__ = (
        "num_blocks",
        "hidden_size",
        "bi_sum",
        "bi_count",
        "angular_sum",
        "angular_count",
        "cka_last",
        "cka_all",
    )
    num_blocks: int
    hidden_size: int
    bi_sum: Tensor | None
    bi_count: Tensor | None
    angular_sum: Tensor | None
    angular_count: Tensor | None
    cka_last: CKASums | None
    cka_all: CKASums | None

    def __init__(
        self,
        num_blocks: int,
        hidden_size: int,
        bi_sum: Tensor | None = None,
        bi_count: Tensor | None = None,
        angular_sum: Tensor | None = None,
        angular_count: Tensor | None = None,
        cka_last: CKASums | None = None,
        cka_all: CKASums | None = None,
    ) -> None:
        self._set(
            num_blocks=num_blocks,
            hidden_size=hidden_size,
            bi_sum=bi_sum,
            bi_count=bi_count,
            angular_sum=angular_sum,
            angular_count=angular_count,
            cka_last=cka_last,
            cka_all=cka_all,
        )


class GlobalStats(_ReadOnly):
    """The reduced sums of a :class:`GlobalStatistics`, per candidate block ``i`` (absent metrics are None).

    ``R`` is the original model's final representation (after the final norm) and ``R_{-i}`` that of the model
    with block ``i`` skipped.

    Args:
        num_blocks: ``L`` (the number of candidates).
        hidden_size: ``d``.
        tokens: ``()``, non-pad tokens behind ``cosine_sum`` and ``kl_sum``.
        cosine_sum: ``(L,)``, Σ over tokens of ``cos(R, R_{-i})``.
        kl_sum: ``(L,)``, Σ over tokens of ``KL(p ‖ p_{-i})`` (nats, full vocabulary).
        cka: last-token CKA sums of ``R`` against each ``R_{-i}``: ``reference_gram`` ``(d, d)``,
            ``reference_colsum`` ``(d,)``, ``gram``/``cross`` ``(L, d, d)`` (``Σ R_{-i} R_{-i}ᵀ``, ``Σ R R_{-i}ᵀ``),
            ``colsum`` ``(L, d)`` and ``samples`` ``()``, as a dict.
    """

    __slots__ = ("num_blocks", "hidden_size", "tokens", "cosine_sum", "kl_sum", "cka")
    num_blocks: int
    hidden_size: int
    tokens: Tensor
    cosine_sum: Tensor | None
    kl_sum: Tensor | None
    cka: dict[str, Tensor] | None

    def __init__(
        self,
        num_blocks: int,
        hidden_size: int,
        tokens: Tensor,
        cosine_sum: Tensor | None = None,
        kl_sum: Tensor | None = None,
        cka: dict[str, Tensor] | None = None,
    ) -> None:
        self._set(
            num_blocks=num_blocks, hidden_size=hidden_size, tokens=tokens, cosine_sum=cosine_sum, kl_sum=kl_sum, cka=cka
        )


def _check_names(name: str, values: Iterable[str], allowed: tuple[str, ...]) -> frozenset[str]:
    """Validate a set of names: non-empty, every one in ``allowed``."""
    if isinstance(values, str):
        values = (values,)
    chosen = frozenset(values)
    unknown = sorted(chosen - set(allowed))
    if unknown or not chosen:
        raise ValueError(f"`{name}` must be a non-empty subset of {list(allowed)}, got {sorted(chosen)}")
    return chosen


def _last_tokens(
    attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(rows, positions)``: samples with at least one token and the position of their last non-pad token.

    Works for right and left padding: the position is that of the last 1 in ``attention_mask`` (the last
    position when there is no mask). Fully padded rows are left out.
    """
    if attention_mask is None:
        rows = torch.arange(batch, device=device)
        return rows, torch.full((batch,), seq_len - 1, device=device, dtype=torch.long)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    ranks = mask * torch.arange(1, seq_len + 1, device=device)  # (B, T): 0 on padding, position + 1 elsewhere
    positions = ranks.argmax(dim=1)  # (B,)
    rows = mask.any(dim=1).nonzero().squeeze(1)  # (B',)
    return rows, positions[rows]


def _check_mask(attention_mask: Tensor | None, hidden: Tensor) -> None:
    """Raise unless the mask is None or ``(B, T)`` for ``(B, T, d)`` hidden states."""
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"`attention_mask` must have shape (batch, seq_len) = {tuple(hidden.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )


def _tokens(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The non-pad rows of ``(B, T, d)`` hidden states as ``(N, d)``."""
    if attention_mask is None:
        return hidden.reshape(-1, hidden.size(-1))
    return hidden[attention_mask.to(device=hidden.device, dtype=torch.bool)]


class DepthStatistics(Metric):
    """Per-block statistics of a decoder's block inputs and outputs, streamed over calibration batches.

    Only the states that ``needs`` asks for are allocated (``L`` blocks, width ``d``, float64):

    * ``bi``: ``bi_sum``/``bi_count`` ``(L,)``: Σ over non-pad tokens of ``cos(h_i, h_{i+1})`` and the token count.
      The cosine is computed in float32 (per token, from the hidden states cast to float32) and summed in float64.
    * ``angular``: ``angular_sum``/``angular_count`` ``(L+1, L+1)``: Σ over samples of ``arccos(cos(h_i, h_j))/π``
      at the last non-pad token for every boundary pair ``i < j`` (float64), serving the one-block angular
      distance (``j = i + 1``) and the n-block variant of Gromov et al. (``j = i + n``).
    * ``cka_last`` / ``cka_all``: ``cka_{last,all}_gram`` ``(L+1, d, d)``, ``_cross`` ``(L, d, d)``, ``_colsum``
      ``(L+1, d)``, ``_count`` ``(L,)``: linear-CKA sums over the last non-pad token of each sample / over every
      non-pad token, accumulated in float64. Each takes ``(2L + 1) d² · 8`` bytes (162 MB for SmolLM2-135M).

    Memory does not depend on the number of calibration tokens. Per batch, :meth:`update` is called once per
    block in order ``0 .. L-1`` (the forward hooks of :func:`collect_depth_statistics` do that); the angular pairs
    need the last-token rows ``(B, d)`` of the boundaries seen so far in the batch, kept until the next batch.

    Args:
        num_blocks: ``L``.
        hidden_size: ``d``.
        needs: a non-empty subset of ``{"bi", "angular", "cka_last", "cka_all"}``.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Raises:
        ValueError: if ``num_blocks`` or ``hidden_size`` is not a positive int, or ``needs`` is empty or names
            something unknown.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    bi_sum: Tensor
    bi_count: Tensor
    angular_sum: Tensor
    angular_count: Tensor

    def __init__(self, num_blocks: int, hidden_size: int, needs: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_int("num_blocks", num_blocks)
        check_int("hidden_size", hidden_size)
        self.needs = _check_names("needs", needs, DEPTH_NEEDS)
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        L, d = num_blocks, hidden_size
        if "bi" in self.needs:
            self.add_state("bi_sum", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("bi_count", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
        if "angular" in self.needs:
            self.add_state("angular_sum", torch.zeros(L + 1, L + 1, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("angular_count", torch.zeros(L + 1, L + 1, dtype=_F64), dist_reduce_fx="sum")
        for kind in ("last", "all"):
            if f"cka_{kind}" in self.needs:
                self.add_state(f"cka_{kind}_gram", torch.zeros(L + 1, d, d, dtype=_F64), dist_reduce_fx="sum")
                self.add_state(f"cka_{kind}_cross", torch.zeros(L, d, d, dtype=_F64), dist_reduce_fx="sum")
                self.add_state(f"cka_{kind}_colsum", torch.zeros(L + 1, d, dtype=_F64), dist_reduce_fx="sum")
                self.add_state(f"cka_{kind}_count", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
        self._angular_rows: list[Tensor] = []  # unit last-token rows (B', d) of h_0 .. h_b in the current batch
        self._next_block = 0

    def reset(self) -> None:
        """Zero every state and forget the rows of a batch in progress."""
        super().reset()
        self._angular_rows = []
        self._next_block = 0

    def update(  # type: ignore[override]
        self, block: int, x_in: Tensor, x_out: Tensor, attention_mask: Tensor | None = None
    ) -> None:
        """Add one block's input and output for one batch.

        Args:
            block: the block index; per batch, call for ``0, 1, .., L-1`` in order.
            x_in: ``(B, T, d)`` hidden states entering the block.
            x_out: ``(B, T, d)`` hidden states leaving it.
            attention_mask: ``(B, T)``, 1 on tokens and 0 on padding (left or right); None: no padding.

        Raises:
            ValueError: if ``block`` is out of range or out of order, the shapes disagree, or the width is not
                ``hidden_size``.
        """
        if not 0 <= block < self.num_blocks or block not in (0, self._next_block):
            raise ValueError(
                f"`block` must be updated in order 0..{self.num_blocks - 1} within a batch: expected 0 or "
                f"{self._next_block}, got {block}"
            )
        if x_in.dim() != 3 or x_in.shape != x_out.shape or x_in.size(-1) != self.hidden_size:
            raise ValueError(
                f"`x_in` and `x_out` must both be (batch, seq_len, hidden_size={self.hidden_size}), "
                f"got {tuple(x_in.shape)} and {tuple(x_out.shape)}"
            )
        _check_mask(attention_mask, x_in)
        self._next_block = block + 1
        device = self.device
        x_in, x_out = x_in.to(device), x_out.to(device)
        mask = None if attention_mask is None else attention_mask.to(device)
        if "bi" in self.needs:
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, T), float32
            if mask is not None:  # where, not a product: padded positions may hold NaN
                cos = torch.where(mask.bool(), cos, 0.0)
            self.bi_sum[block] += cos.sum(dtype=_F64)
            self.bi_count[block] += cos.numel() if mask is None else mask.bool().sum()
        if self.needs & {"angular", "cka_last"}:
            rows, positions = _last_tokens(mask, x_in.size(0), x_in.size(1), device)
            last_in = x_in[rows, positions].to(_F64)  # (B', d)
            last_out = x_out[rows, positions].to(_F64)  # (B', d)
            if "angular" in self.needs:
                self._update_angular(block, last_in, last_out)
            if "cka_last" in self.needs:
                self._update_cka("last", block, last_in, last_out)
        if "cka_all" in self.needs:
            self._update_cka("all", block, _tokens(x_in, mask).to(_F64), _tokens(x_out, mask).to(_F64))

    def _update_angular(self, block: int, last_in: Tensor, last_out: Tensor) -> None:
        """Angular distances between ``h_{block+1}`` and every earlier boundary of this batch (last tokens)."""
        if block == 0:
            self._angular_rows = [F.normalize(last_in, dim=-1)]
        new = F.normalize(last_out, dim=-1)  # (B', d)
        earlier = torch.stack(self._angular_rows)  # (block+1, B', d)
        cos = (earlier * new).sum(-1).clamp(-1.0, 1.0)  # (block+1, B')
        self.angular_sum[: block + 1, block + 1] += torch.arccos(cos).sum(-1) / torch.pi
        self.angular_count[: block + 1, block + 1] += new.size(0)
        self._angular_rows.append(new)
        if block == self.num_blocks - 1:
            self._angular_rows = []

    def _update_cka(self, kind: str, block: int, x: Tensor, y: Tensor) -> None:
        """Add ``(N, d)`` float64 rows of a block's input ``x`` and output ``y`` to the CKA sums."""
        gram, cross = getattr(self, f"cka_{kind}_gram"), getattr(self, f"cka_{kind}_cross")
        colsum, count = getattr(self, f"cka_{kind}_colsum"), getattr(self, f"cka_{kind}_count")
        if block == 0:  # later boundaries h_{i+1} arrive as block outputs
            gram[0].addmm_(x.T, x)
            colsum[0] += x.sum(0)
        gram[block + 1].addmm_(y.T, y)  # (d, d)
        cross[block].addmm_(x.T, y)  # (d, d)
        colsum[block + 1] += y.sum(0)
        count[block] += x.size(0)

    def compute(self) -> DepthStats:
        """The reduced sums (summed over ranks when ``torch.distributed`` is initialized), as copies."""

        def state(name: str) -> Tensor | None:
            value = getattr(self, name, None)
            return value.clone() if isinstance(value, Tensor) else None

        def cka(kind: str) -> CKASums | None:
            if f"cka_{kind}" not in self.needs:
                return None
            parts = {part: state(f"cka_{kind}_{part}") for part in ("gram", "cross", "colsum", "count")}
            return CKASums(**parts)  # type: ignore[arg-type]

        return DepthStats(
            self.num_blocks,
            self.hidden_size,
            bi_sum=state("bi_sum"),
            bi_count=state("bi_count"),
            angular_sum=state("angular_sum"),
            angular_count=state("angular_count"),
            cka_last=cka("last"),
            cka_all=cka("all"),
        )


class GlobalStatistics(Metric):
    """Per candidate block: how much the final output changes when that block is skipped, streamed over batches.

    ``metrics`` picks the states (``L`` candidates, width ``d``, float64):

    * ``cosine``: ``cosine_sum`` ``(L,)``: Σ over non-pad tokens of ``cos(R, R_{-i})`` (final representations,
      after the final norm); ``tokens`` ``()``.
    * ``kl``: ``kl_sum`` ``(L,)``: Σ over non-pad tokens of ``KL(p ‖ p_{-i})`` of the next-token distributions
      (float32 log-softmax over the full vocabulary); ``tokens`` ``()``.
    * ``cka``: last-token linear-CKA sums of ``R`` against each ``R_{-i}``: ``cka_reference_gram`` ``(d, d)``,
      ``cka_reference_colsum`` ``(d,)``, ``cka_gram`` and ``cka_cross`` ``(L, d, d)``, ``cka_colsum`` ``(L, d)``,
      ``cka_samples`` ``()`` (about ``2L d² · 8`` bytes).

    :meth:`update` takes one batch's per-candidate reductions (see :func:`collect_global_statistics`).

    Args:
        num_blocks: ``L``.
        hidden_size: ``d``.
        metrics: a non-empty subset of ``{"cka", "cosine", "kl"}``.
        **kwargs: passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: if ``num_blocks`` or ``hidden_size`` is not a positive int, or ``metrics`` is empty or names
            something unknown.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    tokens: Tensor
    cosine_sum: Tensor
    kl_sum: Tensor
    cka_reference_gram: Tensor
    cka_reference_colsum: Tensor
    cka_gram: Tensor
    cka_cross: Tensor
    cka_colsum: Tensor
    cka_samples: Tensor

    def __init__(self, num_blocks: int, hidden_size: int, metrics: Iterable[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_int("num_blocks", num_blocks)
        check_int("hidden_size", hidden_size)
        self.metrics = _check_names("metrics", metrics, GLOBAL_METRICS)
        self.num_blocks, self.hidden_size = num_blocks, hidden_size
        L, d = num_blocks, hidden_size
        self.add_state("tokens", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        if "cosine" in self.metrics:
            self.add_state("cosine_sum", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
        if "kl" in self.metrics:
            self.add_state("kl_sum", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
        if "cka" in self.metrics:
            self.add_state("cka_reference_gram", torch.zeros(d, d, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("cka_reference_colsum", torch.zeros(d, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("cka_gram", torch.zeros(L, d, d, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("cka_cross", torch.zeros(L, d, d, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("cka_colsum", torch.zeros(L, d, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("cka_samples", torch.zeros((), dtype=_F64), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        num_tokens: Tensor | int,
        cosine_sum: Tensor | None = None,
        kl_sum: Tensor | None = None,
        reference_last: Tensor | None = None,
        candidate_last: Tensor | None = None,
    ) -> None:
        """Add one batch: per-candidate sums over its ``num_tokens`` non-pad tokens and last-token rows.

        Args:
            num_tokens: non-pad tokens in the batch.
            cosine_sum: ``(L,)`` Σ over tokens of ``cos(R, R_{-i})`` (needed for ``cosine``).
            kl_sum: ``(L,)`` Σ over tokens of ``KL(p ‖ p_{-i})`` (needed for ``kl``).
            reference_last: ``(B', d)`` last-token rows of ``R`` (needed for ``cka``).
            candidate_last: ``(L, B', d)`` last-token rows of each ``R_{-i}`` (needed for ``cka``).

        Raises:
            ValueError: if an input a chosen metric needs is missing or has the wrong shape.
        """
        L, d = self.num_blocks, self.hidden_size
        device = self.device
        self.tokens += torch.as_tensor(num_tokens, dtype=_F64, device=device)
        for name, value in (("cosine", cosine_sum), ("kl", kl_sum)):
            if name not in self.metrics:
                continue
            if value is None or tuple(value.shape) != (L,):
                got = None if value is None else tuple(value.shape)
                raise ValueError(f"`{name}_sum` must be a ({L},) tensor for metric {name!r}, got {got}")
            state = getattr(self, f"{name}_sum")
            state += value.to(device=device, dtype=_F64)
        if "cka" not in self.metrics:
            return
        if reference_last is None or candidate_last is None or reference_last.dim() != 2 or reference_last.size(1) != d:
            shapes = [None if t is None else tuple(t.shape) for t in (reference_last, candidate_last)]
            raise ValueError(f"`reference_last` (B, {d}) and `candidate_last` ({L}, B, {d}) are needed, got {shapes}")
        if tuple(candidate_last.shape) != (L, *reference_last.shape):
            raise ValueError(
                f"`candidate_last` must be ({L}, {reference_last.size(0)}, {d}), got {tuple(candidate_last.shape)}"
            )
        x = reference_last.to(device=device, dtype=_F64)  # (B', d)
        y = candidate_last.to(device=device, dtype=_F64)  # (L, B', d)
        self.cka_reference_gram.addmm_(x.T, x)
        self.cka_reference_colsum += x.sum(0)
        self.cka_gram.baddbmm_(y.transpose(1, 2), y)  # (L, d, d)
        self.cka_cross += torch.einsum("bi,lbj->lij", x, y)  # (L, d, d)
        self.cka_colsum += y.sum(1)
        self.cka_samples += x.size(0)

    def compute(self) -> GlobalStats:
        """The reduced sums (summed over ranks when ``torch.distributed`` is initialized), as copies."""
        cka = None
        if "cka" in self.metrics:
            cka = {
                part: getattr(self, f"cka_{part}").clone()
                for part in ("reference_gram", "reference_colsum", "gram", "cross", "colsum", "samples")
            }
        return GlobalStats(
            self.num_blocks,
            self.hidden_size,
            tokens=self.tokens.clone(),
            cosine_sum=self.cosine_sum.clone() if "cosine" in self.metrics else None,
            kl_sum=self.kl_sum.clone() if "kl" in self.metrics else None,
            cka=cka,
        )


class Hooks:
    """Owns forward (pre-)hooks and removes all of them on exit, also when the body raises.

    Lifecycle: enter the context, register with :meth:`forward` / :meth:`forward_pre` (handles are kept), run the
    model; ``__exit__`` calls :meth:`remove`, which removes every handle registered through this object.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> seen = []
        >>> with Hooks() as hooks:
        ...     _ = hooks.forward(layer, lambda module, args, kwargs, output: seen.append(output.shape))
        ...     _ = layer(torch.zeros(1, 2))
        >>> seen, len(layer._forward_hooks)
        ([torch.Size([1, 2])], 0)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(module, args, kwargs, output)`` after ``module``'s forward."""
        handle = module.register_forward_hook(hook, with_kwargs=True)
        self._handles.append(handle)
        return handle

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(module, args, kwargs)`` before ``module``'s forward."""
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook registered through this object."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def _block_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor:
    """The hidden states a block received: its first positional argument or ``hidden_states``."""
    return args[0] if args else kwargs["hidden_states"]


def _block_output(output: Any) -> Tensor:
    """The hidden states a block returned: a tensor, or the first element of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _as_inputs(item: Batch) -> tuple[Tensor, Tensor | None]:
    """``(input_ids, attention_mask or None)`` of one batch, validated."""
    if isinstance(item, Tensor):
        ids, mask = item, None
    elif isinstance(item, Mapping) and "input_ids" in item:
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        kind = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise TypeError(f"Each batch must be a LongTensor (B, T) or a dict with `input_ids`, got {kind}")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        got = f"shape {tuple(ids.shape)} and dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"`input_ids` must be a 2-D integer tensor (batch, seq_len), got {got}")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"`attention_mask` must have the shape of `input_ids` {tuple(ids.shape)}, got {tuple(mask.shape)}"
        )
    return ids, mask


def _iterate(batches: Batches, max_batches: int | None) -> tuple[Iterator[Batch], int | None]:
    """The batches (a single 2-D tensor is one batch), at most ``max_batches``, and their number if known."""
    items: Iterable[Batch] = [batches] if isinstance(batches, Tensor) else batches
    try:
        total: int | None = len(items)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return islice(items, max_batches), total


def collect_depth_statistics(
    model: nn.Module,
    batches: Batches,
    needs: Iterable[str],
    max_batches: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> DepthStatistics:
    """One pass of the decoder stack over calibration batches, filling a :class:`DepthStatistics` from hooks.

    Only the decoder runs (no LM head). A forward hook on every block updates the statistics as the block
    finishes, so no batch keeps its ``L`` hidden states alive (the angular pairs keep the last-token rows
    ``(B, d)`` of each boundary). Runs under ``torch.no_grad()`` in eval mode; every module's mode is restored and
    the hooks are removed afterwards, also when the forward raises.

    Args:
        model: a Hugging Face causal LM (or a wrapper around one) whose family has an adapter.
        batches: an iterable (e.g. a DataLoader) of LongTensors ``(B, T)`` or of dicts with ``input_ids`` and
            optional ``attention_mask`` (left or right padding); a single 2-D tensor is one batch.
        needs: what to collect, a non-empty subset of ``{"bi", "angular", "cka_last", "cka_all"}``.
        max_batches: stop after this many batches (None: all).
        progress: show a tqdm progress bar.
        device: where to run; default the model's current device (the statistics live there too).

    Returns:
        The filled metric; ``.compute()`` gives the :class:`DepthStats` (summed over ranks under DDP).

    Raises:
        ValueError: if ``needs`` is invalid, ``max_batches`` is not a positive int or None, a batch is malformed,
            or there is no batch.
        TypeError: if a batch is neither a tensor nor a dict with ``input_ids``.
    """
    check_int("max_batches", max_batches, allow_none=True)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    metric = DepthStatistics(len(blocks), adapter.hidden_size(model), needs)
    items, total = _iterate(batches, max_batches)
    current: dict[str, Tensor | None] = {"attention_mask": None}

    def block_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            metric.update(index, _block_input(args, kwargs), _block_output(output), current["attention_mask"])

        return hook

    seen = 0
    with evaluating(model, device) as (hf_model, target), torch.no_grad(), Hooks() as hooks:
        metric.to(target)
        decoder = adapter.decoder(hf_model)
        for index, block in enumerate(blocks):
            hooks.forward(block, block_hook(index))
        for item in tqdm(items, total=total, desc="depth statistics", disable=not progress, leave=False):
            ids, mask = _as_inputs(item)
            ids = ids.to(target)
            current["attention_mask"] = None if mask is None else mask.to(target)
            decoder(input_ids=ids, attention_mask=current["attention_mask"], use_cache=False)
            seen += 1
    if seen == 0:
        raise ValueError("`batches` is empty: no calibration batch to collect statistics from")
    log.debug("Depth statistics %s over %d batches of %d blocks", sorted(metric.needs), seen, len(blocks))
    return metric


def _cosine_sum(reference: Tensor, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Σ over non-pad tokens of ``cos(reference, hidden)`` for ``(B, T, d)`` inputs (float32 cosine, float64 sum)."""
    cos = F.cosine_similarity(reference.float(), hidden.float(), dim=-1)  # (B, T)
    if attention_mask is not None:
        cos = torch.where(attention_mask.bool(), cos, 0.0)
    return cos.sum(dtype=_F64)


def _kl_sum(reference_logp: Tensor, reference_p: Tensor, logits: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Σ over non-pad tokens of ``KL(p ‖ q)``, ``q = softmax(logits)`` (float32), ``p`` given as probs and log-probs."""
    logq = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    kl = (reference_p * (reference_logp - logq)).sum(-1)  # (B, T)
    if attention_mask is not None:
        kl = torch.where(attention_mask.bool(), kl, 0.0)
    return kl.sum(dtype=_F64)


class _Capture:
    """Forward pre-hooks that record what the decoder passes to each block during one reference forward."""

    def __init__(self, num_blocks: int) -> None:
        self.active = False
        self.first_input: Tensor | None = None
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * num_blocks

    def hook(self, index: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.active:
                return
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                self.first_input = hidden
            for key, value in (("use_cache", False), ("past_key_values", None)):
                if key in kwargs:
                    kwargs[key] = value
            self.calls[index] = (tuple(args[1:]), kwargs)

        return pre_hook

    def run(self, block: nn.Module, index: int, hidden: Tensor) -> Tensor:
        """Block ``index`` on ``hidden`` with the extra arguments recorded for it (causal mask, rotary, ...)."""
        call = self.calls[index]
        if call is None:
            raise RuntimeError(f"Block {index} was not called during the reference forward; cannot replay it")
        args, kwargs = call
        return _block_output(block(hidden, *args, **kwargs))


def collect_global_statistics(
    model: nn.Module,
    batches: Batches,
    metrics: Iterable[str] = GLOBAL_METRICS,
    max_batches: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> GlobalStatistics:
    """Compare, for every candidate block, the original model's output with that of the model without the block.

    Per batch: one ordinary decoder forward gives the original final representation ``R`` (after the final norm)
    and, through pre-hooks, the arguments each block receives (causal mask, position ids and embeddings;
    ``use_cache=False``). Then the prefix runs once: with ``h_i`` the input of block ``i``, candidate ``i`` runs
    blocks ``i+1 .. L-1``, the final norm (and the LM head for ``kl``) from ``h_i``, after which ``h_i`` advances
    through block ``i``. That is ``L (L + 3) / 2`` block calls per batch instead of ``L²`` for one model copy per
    candidate. Working memory is one batch's: a few ``(B, T, d)`` hidden states, plus, for ``kl``, the original
    log-probabilities and probabilities ``(B, T, V)`` float32 and one candidate's; it does not grow with the number
    of batches. Last-token rows ``(L, B, d)`` are kept per batch for ``cka``.

    Args:
        model: a Hugging Face causal LM (or a wrapper around one) whose family has an adapter.
        batches: as for :func:`collect_depth_statistics`.
        metrics: a non-empty subset of ``{"cka", "cosine", "kl"}``: last-token CKA and all-token cosine of the final
            representations, and the KL divergence of the next-token distributions (mean over non-pad tokens).
        max_batches: stop after this many batches (None: all).
        progress: show a tqdm progress bar over batches.
        device: where to run; default the model's current device.

    Returns:
        The filled :class:`GlobalStatistics`; ``.compute()`` gives the :class:`GlobalStats`.

    Raises:
        ValueError: if ``metrics`` is invalid, ``kl`` is asked of a model without an LM head, ``max_batches`` is
            not a positive int or None, a batch is malformed, or there is no batch.
        TypeError: if a batch is neither a tensor nor a dict with ``input_ids``.
    """
    check_int("max_batches", max_batches, allow_none=True)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    L = len(blocks)
    metric = GlobalStatistics(L, adapter.hidden_size(model), metrics)
    head = adapter.lm_head(model)
    if "kl" in metric.metrics and head is None:
        raise ValueError(f"metric 'kl' needs an LM head, but {type(model).__name__} has none")
    items, total = _iterate(batches, max_batches)
    capture = _Capture(L)
    seen = 0
    with evaluating(model, device) as (hf_model, target), torch.no_grad(), Hooks() as hooks:
        metric.to(target)
        decoder, norm = adapter.decoder(hf_model), adapter.final_norm(hf_model)
        for index, block in enumerate(blocks):
            hooks.forward_pre(block, capture.hook(index))
        for item in tqdm(items, total=total, desc="global statistics", disable=not progress, leave=False):
            ids, mask = _as_inputs(item)
            ids, mask = ids.to(target), None if mask is None else mask.to(target)
            capture.active = True
            try:
                reference = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B,T,d)
            finally:
                capture.active = False
            ref_logp = ref_p = None
            if head is not None and "kl" in metric.metrics:
                ref_logp = torch.log_softmax(head(reference).float(), dim=-1)  # (B, T, V)
                ref_p = ref_logp.exp()
            rows, positions = _last_tokens(mask, ids.size(0), ids.size(1), ids.device)
            cos_sums, kl_sums, last_rows = [], [], []
            hidden = capture.first_input
            assert hidden is not None  # set by the pre-hook of block 0 during the forward above
            for i in range(L):
                out = hidden
                for j in range(i + 1, L):
                    out = capture.run(blocks[j], j, out)
                final = norm(out)  # (B, T, d): R_{-i}
                if "cosine" in metric.metrics:
                    cos_sums.append(_cosine_sum(reference, final, mask))
                if ref_logp is not None and ref_p is not None and head is not None:
                    kl_sums.append(_kl_sum(ref_logp, ref_p, head(final), mask))
                if "cka" in metric.metrics:
                    last_rows.append(final[rows, positions])  # (B', d)
                if i < L - 1:
                    hidden = capture.run(blocks[i], i, hidden)  # h_{i+1}
            metric.update(
                num_tokens=ids.numel() if mask is None else int(mask.sum()),
                cosine_sum=torch.stack(cos_sums) if cos_sums else None,
                kl_sum=torch.stack(kl_sums) if kl_sums else None,
                reference_last=reference[rows, positions] if last_rows else None,
                candidate_last=torch.stack(last_rows) if last_rows else None,
            )
            seen += 1
        capture.calls = [None] * L
        capture.first_input = None
    if seen == 0:
        raise ValueError("`batches` is empty: no calibration batch to collect statistics from")
    log.debug("Global statistics %s over %d batches for %d candidate blocks", sorted(metric.metrics), seen, L)
    return metric
