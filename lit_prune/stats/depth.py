"""One-pass block statistics (Block Influence, angular distance, linear CKA), gathered by hooks on every block.

:class:`DepthStatistics` holds sufficient statistics (sums, Gram matrices, counts), all float64 and reduced with
``dist_reduce_fx="sum"``, so ranks that saw different batches reduce to the same numbers and memory does not
depend on the number of calibration tokens. Boundaries are numbered ``h_0 .. h_L``: ``h_i`` enters block ``i`` and
``h_L`` leaves the last block (before the final norm). The criteria live in :mod:`lit_prune.criteria.depth`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lit_prune._validation import check_int
from lit_prune.arch import adapter_for
from lit_prune.functional.similarity import CKA_FORMS, CKAForm, masked_count, masked_sum, token_cosine
from lit_prune.stats._common import (
    _F64,
    Batches,
    CKASums,
    _block_input,
    _block_output,
    _check_mask,
    _check_names,
    _last_tokens,
    _ReadOnly,
    _tokens,
)
from lit_prune.stats.engine import hooked_pass
from lit_prune.stats.hooks import Hooks

log = logging.getLogger(__name__)

DEPTH_NEEDS = ("angular", "bi", "cka_all", "cka_last")
"""What a :class:`DepthStatistics` can collect."""


@dataclass(frozen=True, repr=False)
class CKARows:
    """Linear-CKA rows of the boundaries ``h_0 .. h_L`` (the ``n × n`` form; float64).

    Args:
        rows: ``(L+1, n, d)``, the ``n`` rows (samples or tokens, every rank's in rank order) of each boundary.
    """

    rows: Tensor

    def __repr__(self) -> str:
        return f"CKARows(rows={tuple(self.rows.shape)})"


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
        cka_last: CKA sums (or rows, with ``cka_form="rows"``) over the last non-pad token of each sample.
        cka_all: CKA sums (or rows) over every non-pad token.
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
    cka_last: CKASums | CKARows | None
    cka_all: CKASums | CKARows | None

    def __init__(
        self,
        num_blocks: int,
        hidden_size: int,
        bi_sum: Tensor | None = None,
        bi_count: Tensor | None = None,
        angular_sum: Tensor | None = None,
        angular_count: Tensor | None = None,
        cka_last: CKASums | CKARows | None = None,
        cka_all: CKASums | CKARows | None = None,
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


class DepthStatistics(Metric):
    """Per-block statistics of a decoder's block inputs and outputs, streamed over calibration batches.

    Only the states that ``needs`` asks for are allocated (``L`` blocks, width ``d``, float64):

    * ``bi``: ``bi_sum``/``bi_count`` ``(L,)``: Σ over non-pad tokens of ``cos(h_i, h_{i+1})`` and the token count.
      The cosine is computed in float32 (per token, from the hidden states cast to float32) and summed in float64
      (:func:`~lit_prune.functional.similarity.token_cosine`, :func:`~lit_prune.functional.similarity.masked_sum`).
    * ``angular``: ``angular_sum``/``angular_count`` ``(L+1, L+1)``: Σ over samples of ``arccos(cos(h_i, h_j))/π``
      at the last non-pad token for every boundary pair ``i < j`` (float64), serving the one-block angular
      distance (``j = i + 1``) and the n-block variant of Gromov et al. (``j = i + n``).
    * ``cka_last`` / ``cka_all``: ``cka_{last,all}_gram`` ``(L+1, d, d)``, ``_cross`` ``(L, d, d)``, ``_colsum``
      ``(L+1, d)``, ``_count`` ``(L,)``: linear-CKA sums over the last non-pad token of each sample / over every
      non-pad token, accumulated in float64. Each takes ``(2L + 1) d² · 8`` bytes (162 MB for SmolLM2-135M).
      With ``cka_form="rows"`` they are instead ``cka_{last,all}_rows``: the rows themselves, a list of ``(B', L+1,
      d)`` float64 tensors per batch, concatenated over ranks (``dist_reduce_fx="cat"``), ``(L+1) n d · 8`` bytes
      for ``n`` rows; the criterion then uses the ``n × n`` form of CKA, cheaper when ``n < d``
      (:func:`~lit_prune.functional.similarity.cka_form`).

    Memory does not depend on the number of calibration tokens (except for ``cka_form="rows"``). Per batch,
    :meth:`update` is called once per
    block in order ``0 .. L-1`` (the forward hooks of :func:`collect_depth_statistics` do that); the angular pairs
    need the last-token rows ``(B, d)`` of the boundaries seen so far in the batch, kept until the next batch.

    Args:
        num_blocks: ``L``.
        hidden_size: ``d``.
        needs: a non-empty subset of ``{"bi", "angular", "cka_last", "cka_all"}``.
        cka_form: ``"sums"`` (default; ``d × d`` Gram sums, memory independent of ``n``) or ``"rows"`` (keep the
            rows; for few samples of a wide model, e.g. CKA-LoRA's).
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Raises:
        ValueError: if ``num_blocks`` or ``hidden_size`` is not a positive int, ``needs`` is empty or names
            something unknown, or ``cka_form`` is not ``"sums"`` or ``"rows"``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    bi_sum: Tensor
    bi_count: Tensor
    angular_sum: Tensor
    angular_count: Tensor

    def __init__(
        self, num_blocks: int, hidden_size: int, needs: Iterable[str], cka_form: CKAForm = "sums", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        check_int("num_blocks", num_blocks)
        check_int("hidden_size", hidden_size)
        self.needs = _check_names("needs", needs, DEPTH_NEEDS)
        if cka_form not in CKA_FORMS:
            raise ValueError(f"`cka_form` must be one of {list(CKA_FORMS)}, got {cka_form!r}")
        self.num_blocks, self.hidden_size, self.cka_form = num_blocks, hidden_size, cka_form
        L, d = num_blocks, hidden_size
        if "bi" in self.needs:
            self.add_state("bi_sum", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("bi_count", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
        if "angular" in self.needs:
            self.add_state("angular_sum", torch.zeros(L + 1, L + 1, dtype=_F64), dist_reduce_fx="sum")
            self.add_state("angular_count", torch.zeros(L + 1, L + 1, dtype=_F64), dist_reduce_fx="sum")
        for kind in ("last", "all"):
            if f"cka_{kind}" in self.needs and cka_form == "rows":
                self.add_state(f"cka_{kind}_rows", [], dist_reduce_fx="cat")  # per batch (B', L+1, d)
            elif f"cka_{kind}" in self.needs:
                self.add_state(f"cka_{kind}_gram", torch.zeros(L + 1, d, d, dtype=_F64), dist_reduce_fx="sum")
                self.add_state(f"cka_{kind}_cross", torch.zeros(L, d, d, dtype=_F64), dist_reduce_fx="sum")
                self.add_state(f"cka_{kind}_colsum", torch.zeros(L + 1, d, dtype=_F64), dist_reduce_fx="sum")
                self.add_state(f"cka_{kind}_count", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
        self._angular_rows: list[Tensor] = []  # unit last-token rows (B', d) of h_0 .. h_b in the current batch
        self._cka_rows: dict[str, list[Tensor]] = {"last": [], "all": []}  # rows form: h_0 .. h_b of this batch
        self._next_block = 0

    def reset(self) -> None:
        """Zero every state and forget the rows of a batch in progress."""
        super().reset()
        self._angular_rows = []
        self._cka_rows = {"last": [], "all": []}
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
            cos = token_cosine(x_in, x_out)  # (B, T), float32
            self.bi_sum[block] += masked_sum(cos, mask)  # padded positions may hold NaN: dropped, not multiplied
            self.bi_count[block] += masked_count(cos, mask)
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
        """Add ``(N, d)`` float64 rows of a block's input ``x`` and output ``y`` to the CKA sums (or rows)."""
        if self.cka_form == "rows":
            batch_rows = self._cka_rows[kind]
            if block == 0:  # a new batch (also after an interrupted one)
                batch_rows.clear()
                batch_rows.append(x)
            batch_rows.append(y)
            if block == self.num_blocks - 1:
                getattr(self, f"cka_{kind}_rows").append(torch.stack(batch_rows, dim=1))  # (N, L+1, d)
                batch_rows.clear()
            return
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

        def cka(kind: str) -> CKASums | CKARows | None:
            if f"cka_{kind}" not in self.needs:
                return None
            if self.cka_form == "rows":
                value = getattr(self, f"cka_{kind}_rows")  # a list, or one tensor after a DDP sync
                if isinstance(value, list) and not value:  # no batch yet: no rows
                    empty = torch.zeros(self.num_blocks + 1, 0, self.hidden_size, dtype=_F64, device=self.device)
                    return CKARows(empty)
                return CKARows(dim_zero_cat(value).movedim(0, 1).contiguous())  # (L+1, n, d)
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


def collect_depth_statistics(
    model: nn.Module,
    batches: Batches,
    needs: Iterable[str],
    max_batches: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    *,
    cka_form: CKAForm = "sums",
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
        cka_form: how the ``cka_*`` needs are kept (see :class:`DepthStatistics`): ``"sums"`` or ``"rows"``.

    Returns:
        The filled metric; ``.compute()`` gives the :class:`DepthStats` (summed over ranks under DDP).

    Raises:
        ValueError: if ``needs`` is invalid, ``max_batches`` is not a positive int or None, a batch is malformed,
            or there is no batch.
        TypeError: if a batch is neither a tensor nor a dict with ``input_ids``.
    """
    metric = hooked_pass(
        model,
        batches,
        lambda hf_model, hooks, current: attach_depth_statistics(hf_model, needs, hooks, current, cka_form),
        max_batches=max_batches,
        progress=progress,
        device=device,
        desc="depth statistics",
    )
    seen = "all" if max_batches is None else f"<= {max_batches}"
    log.debug("Depth statistics %s over %s batches of %d blocks", sorted(metric.needs), seen, metric.num_blocks)
    return metric


def attach_depth_statistics(
    model: nn.Module,
    needs: Iterable[str],
    hooks: Hooks,
    current: dict[str, Tensor | None],
    cka_form: CKAForm = "sums",
    **metric_kwargs: Any,
) -> DepthStatistics:
    """Register, through ``hooks``, forward hooks that fill a new :class:`DepthStatistics` from ``model``'s blocks.

    An ``Attach`` of the pass driver (:func:`~lit_prune.stats.engine.run_pass`), which sets
    ``current["attention_mask"]`` before each batch and removes the hooks when done. The metric is sized for the
    blocks the model has now; ``metric_kwargs`` go to it (e.g. ``sync_on_compute=False``).
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    metric = DepthStatistics(len(blocks), adapter.hidden_size(model), needs, cka_form, **metric_kwargs)

    def block_hook(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            metric.update(index, _block_input(args, kwargs), _block_output(output), current["attention_mask"])

        return hook

    for index, block in enumerate(blocks):
        hooks.forward(block, block_hook(index))
    return metric
