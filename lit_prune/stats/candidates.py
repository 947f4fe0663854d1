"""Per-candidate ("global") statistics: the original model against the model with one block skipped.

:class:`GlobalStatistics` compares the final representation and next-token distribution of the original model with
those of the model without block ``i``, for every ``i``; the prefix is computed once per batch and each candidate
starts from its block's cached input. Sums are float64 and reduced with ``dist_reduce_fx="sum"``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_prune._validation import check_int
from lit_prune.arch import adapter_for, unwrap
from lit_prune.eval._common import model_device
from lit_prune.functional.similarity import masked_sum, token_cosine, token_kl
from lit_prune.stats._common import _F64, Batches, _check_names, _last_tokens, _ReadOnly
from lit_prune.stats.engine import run_pass
from lit_prune.stats.hooks import Hooks
from lit_prune.stats.replay import BlockCalls

log = logging.getLogger(__name__)

GLOBAL_METRICS = ("cka", "cosine", "kl")
"""What a :class:`GlobalStatistics` can collect."""


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


class CandidateReplay:
    """Fills a :class:`GlobalStatistics` from each reference forward of a pass: the collector of the global criteria.

    Its :class:`~lit_prune.stats.replay.BlockCalls` record (through the pass's hooks, see :meth:`attach`) the
    arguments every block receives; the pass driver calls :meth:`on_batch` after each forward, hooks paused, with
    the original final representation ``R``. There the prefix runs once: with ``h_i`` the input of block ``i``,
    candidate ``i`` runs blocks ``i+1 .. L-1``, the final norm (and the LM head for ``kl``) from ``h_i``, after which
    ``h_i`` advances through block ``i``. That is ``L (L + 3) / 2`` block calls per batch instead of ``L²`` for one
    model copy per candidate.

    Raises:
        ValueError: if ``metrics`` is invalid or ``kl`` is asked of a model without an LM head.
    """

    def __init__(self, model: nn.Module, metrics: Iterable[str], **metric_kwargs: Any) -> None:
        adapter = adapter_for(model)
        self.blocks = adapter.blocks(model)
        self.metric = GlobalStatistics(len(self.blocks), adapter.hidden_size(model), metrics, **metric_kwargs)
        self.head = adapter.lm_head(model)
        if "kl" in self.metric.metrics and self.head is None:
            raise ValueError(f"metric 'kl' needs an LM head, but {type(model).__name__} has none")
        self.norm = adapter.final_norm(model)
        self.calls = BlockCalls(self.blocks)
        self.metric.to(model_device(model))

    def attach(self, hooks: Hooks) -> CandidateReplay:
        """Record the blocks' calls through ``hooks`` (a pass's), with the metric where the model is now; ``self``."""
        self.calls.attach(hooks)
        self.metric.to(model_device(self.blocks))
        return self

    def on_batch(self, model: nn.Module, ids: Tensor, mask: Tensor | None, output: Any) -> None:
        """Score every candidate on the batch just forwarded (``output``: the decoder's, final norm applied)."""
        metric, head, blocks, calls = self.metric, self.head, self.blocks, self.calls
        L = len(blocks)
        reference = output.last_hidden_state  # (B, T, d)
        ref_logp = ref_p = None
        if head is not None and "kl" in metric.metrics:
            ref_logp = torch.log_softmax(head(reference).float(), dim=-1)  # (B, T, V)
            ref_p = ref_logp.exp()
        rows, positions = _last_tokens(mask, ids.size(0), ids.size(1), ids.device)
        cos_sums, kl_sums, last_rows = [], [], []
        hidden = calls.first_input
        assert hidden is not None  # set by the pre-hook of block 0 during the forward
        for i in range(L):
            out = hidden
            for j in range(i + 1, L):
                out = calls.run(blocks[j], j, out)
            final = self.norm(out)  # (B, T, d): R_{-i}
            if "cosine" in metric.metrics:
                cos_sums.append(masked_sum(token_cosine(reference, final), mask))
            if ref_logp is not None and ref_p is not None and head is not None:
                kl_sums.append(masked_sum(token_kl(ref_logp, head(final), ref_p), mask))
            if "cka" in metric.metrics:
                last_rows.append(final[rows, positions])  # (B', d)
            if i < L - 1:
                hidden = calls.run(blocks[i], i, hidden)  # h_{i+1}
        metric.update(
            num_tokens=ids.numel() if mask is None else int(mask.sum()),
            cosine_sum=torch.stack(cos_sums) if cos_sums else None,
            kl_sum=torch.stack(kl_sums) if kl_sums else None,
            reference_last=reference[rows, positions] if last_rows else None,
            candidate_last=torch.stack(last_rows) if last_rows else None,
        )
        calls.clear()


def collect_global_statistics(
    model: nn.Module,
    batches: Batches,
    metrics: Iterable[str] = GLOBAL_METRICS,
    max_batches: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> GlobalStatistics:
    """Compare, for every candidate block, the original model's output with that of the model without the block.

    One :func:`~lit_prune.stats.engine.run_pass` with a :class:`CandidateReplay`: per batch, one ordinary decoder
    forward gives the original final representation ``R`` (after the final norm) and, through pre-hooks, the
    arguments each block receives (causal mask, position ids and embeddings; ``use_cache=False``); then every
    candidate is replayed from its block's input. Working memory is one batch's: a few ``(B, T, d)`` hidden states,
    plus, for ``kl``, the original log-probabilities and probabilities ``(B, T, V)`` float32 and one candidate's; it
    does not grow with the number of batches. Last-token rows ``(L, B, d)`` are kept per batch for ``cka``.

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
    replay = CandidateReplay(unwrap(model), metrics)  # validated before any forward
    collectors = run_pass(
        model,
        batches,
        {"replay": lambda hf_model, hooks, current: replay.attach(hooks)},
        on_batch=replay.on_batch,
        max_batches=max_batches,
        progress=progress,
        device=device,
        desc="global statistics",
    )
    metric: GlobalStatistics = collectors["replay"].metric
    log.debug("Global statistics %s for %d candidate blocks", sorted(metric.metrics), metric.num_blocks)
    return metric
