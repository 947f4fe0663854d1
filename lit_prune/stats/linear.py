"""Per-Linear input statistics: the :class:`LinearInputStatistics` metric, its :class:`LinearStats` result, and hooks.

What a criterion can ask for (``needs``), from the Linear's input ``x``, one row per non-pad token:

- ``"input_sq"``: ``Σ x_j²`` per input feature, float64 ``(in,)`` (Wanda's ``‖X_j‖₂²``).
- ``"hessian"``: ``Σ x xᵀ``, float64 ``(in, in)`` (SparseGPT's ``H = 2/n · Σ x xᵀ``; the scale cancels in its mask
  and update, so divide by ``count`` or not).
- ``"last_token"``: the input at each sequence's last non-pad token, float32 ``(n_seq, in)`` (TRIM).

``count`` (non-pad tokens) is always kept. Everything is a torchmetrics state reduced with ``dist_reduce_fx="sum"``
(the rows with ``"cat"``), never a running mean, so under DDP ``compute()`` gives every rank the same sums.
:func:`attach_linear_statistics` registers the pre-hooks that fill one metric per Linear input tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_prune._validation import check_int
from lit_prune.stats._common import _F64, _check_names, _f64_chunks, _last_tokens, _ReadOnly
from lit_prune.stats.hooks import Hooks

NEEDS = ("hessian", "input_sq", "last_token")
"""The statistics a criterion can ask for."""

class LinearStats(_ReadOnly):
    """The reduced sums of one Linear's non-pad input tokens (what the criteria read); the fields not asked are None.

    Args:
        count: non-pad tokens seen.
        input_sq: ``(in,)`` float64, ``Σ x_j²``.
        hessian_sum: ``(in, in)`` float64, ``Σ x xᵀ``.
        last_inputs: ``(n_seq, in)`` float32, the input at the last non-pad token of each sequence (rank order).
    """

    __slots__ = ("count", "input_sq", "hessian_sum", "last_inputs")
    count: int
    input_sq: Tensor | None
    hessian_sum: Tensor | None
    last_inputs: Tensor | None

    def __init__(
        self,
        count: int = 0,
        input_sq: Tensor | None = None,
        hessian_sum: Tensor | None = None,
        last_inputs: Tensor | None = None,
    ) -> None:
        self._set(count=count, input_sq=input_sq, hessian_sum=hessian_sum, last_inputs=last_inputs)

    def __reduce__(self) -> tuple[type[LinearStats], tuple[Any, ...]]:
        """Pickle (``torch.save``, ``copy.deepcopy``) through the constructor: the attributes cannot be set later."""
        return LinearStats, (self.count, self.input_sq, self.hessian_sum, self.last_inputs)

    def clone(self) -> LinearStats:
        """A copy with cloned tensors."""

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return LinearStats(self.count, copy(self.input_sq), copy(self.hessian_sum), copy(self.last_inputs))

    def input_norm(self) -> Tensor:
        """Wanda's per-feature input norm ``‖X_j‖₂ = sqrt(Σ x_j²)`` (needs ``"input_sq"``)."""
        if self.input_sq is None:
            raise ValueError('`input_norm` needs the "input_sq" statistic, which was not collected')
        return self.input_sq.sqrt()


class LinearInputStatistics(Metric):
    """Sums over the non-pad input tokens of one Linear, streamed over calibration batches.

    States (only those ``needs`` asks for, besides ``count``): ``count`` (int64, sum), ``input_sq`` ``(in,)`` and
    ``hessian`` ``(in, in)`` (float64, sum), ``last_inputs`` (float32 ``(B', in)`` rows, ``"cat"``: concatenated in
    rank order under DDP). :meth:`update` replaces the state tensors rather than writing into them, so
    :meth:`compute` hands them out without a copy; the reset values are held as zero-stride views (8 bytes, not a
    second Hessian). Over ranks, ``count``, ``input_sq`` and the rows equal one process's over the same batches bit
    for bit; ``hessian`` up to float64 rounding (each batch's ``Σ x xᵀ`` is added inside the GEMM, ``addmm``).

    Args:
        in_features: the Linear's input width.
        needs: a non-empty subset of ``("hessian", "input_sq", "last_token")``.
        device: where the states live (None: CPU).
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute=False`` keeps each rank's own sums).

    Raises:
        ValueError: if ``in_features`` is not a positive int or ``needs`` is empty or names something unknown.

    Example:
        >>> metric = LinearInputStatistics(4, {"input_sq"})
        >>> metric.update(torch.ones(2, 3, 4), torch.tensor([[1, 1, 1], [1, 0, 0]]))
        >>> stats = metric.compute()
        >>> stats.count, stats.input_sq.tolist(), stats.hessian_sum
        (4, [4.0, 4.0, 4.0, 4.0], None)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    count: Tensor
    input_sq: Tensor
    hessian: Tensor
    last_inputs: list[Tensor] | Tensor

    def __init__(
        self, in_features: int, needs: Iterable[str], device: str | torch.device | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        check_int("in_features", in_features)
        self.needs = _check_names("needs", needs, NEEDS)
        self.in_features = in_features
        if device is not None:
            self.to(device)  # before any state: the states below are created there and `self.device` says so
        self._add_sum_state("count", (), torch.long)
        if "input_sq" in self.needs:
            self._add_sum_state("input_sq", (in_features,), _F64)
        if "hessian" in self.needs:
            self._add_sum_state("hessian", (in_features, in_features), _F64)
        if "last_token" in self.needs:
            self.add_state("last_inputs", [], dist_reduce_fx="cat")

    def _add_sum_state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.add_state(name, torch.zeros(shape, dtype=dtype, device=self.device), dist_reduce_fx="sum")
        self._defaults[name] = torch.zeros((), dtype=dtype, device=self.device).expand(shape)  # reset() clones it

    def update(self, x: Tensor, attention_mask: Tensor | None = None) -> None:  # type: ignore[override]
        """Add the inputs ``x`` (``(B, T, in)`` with a ``(B, T)`` padding mask, or ``(N, in)`` tokens).

        A mask that does not match ``x``'s first two dimensions is not applied. The sums are accumulated in float64
        from inputs cast to float64 before any product (see ``lit_prune.stats._common._CHUNK_ELEMENTS``), so they do
        not depend on the BLAS blocking, the batch shape or the padding.

        Raises:
            ValueError: if ``x`` is not 2-D or 3-D with ``in_features`` columns.
        """
        if x.dim() not in (2, 3) or x.size(-1) != self.in_features:
            raise ValueError(
                f"`x` must be (batch, seq_len, {self.in_features}) or (tokens, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        x = x.detach().to(self.device)
        masked = attention_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(attention_mask.shape)
        keep = attention_mask.to(device=x.device, dtype=torch.bool) if masked else None  # type: ignore[union-attr]
        tokens = x[keep] if keep is not None else x.reshape(-1, x.size(-1))  # (N, in)
        self.count += tokens.shape[0]
        for chunk in _f64_chunks(tokens):  # (n, in), exact: products and sums in float64
            if "input_sq" in self.needs:
                self.input_sq = self.input_sq + chunk.square().sum(0)
            if "hessian" in self.needs:
                self.hessian = torch.addmm(self.hessian, chunk.T, chunk)  # Σ x xᵀ, (in, in)
        if "last_token" in self.needs:
            if x.dim() == 3:
                rows, positions = _last_tokens(keep, x.shape[0], x.shape[1], x.device)
                last = x[rows, positions]  # (B', in)
            else:
                last = x[-1:]  # a flat batch: one sequence
            self.last_inputs.append(last.to(torch.float32))  # type: ignore[union-attr]

    def compute(self) -> LinearStats:
        """The sums (over every rank's batches when ``torch.distributed`` is initialized and ``sync_on_compute``)."""
        rows: Tensor | None = None
        if "last_token" in self.needs:
            kept = self.last_inputs  # synced: every rank's rows concatenated; else this rank's list of (B', in)
            if isinstance(kept, Tensor):
                rows = kept
            else:
                rows = torch.cat(kept) if kept else torch.zeros(0, self.in_features, device=self.device)  # float32
        return LinearStats(
            count=int(self.count),
            input_sq=getattr(self, "input_sq", None),
            hessian_sum=getattr(self, "hessian", None),
            last_inputs=rows,
        )


def _zero_stats(in_features: int, needs: frozenset[str], device: torch.device) -> LinearStats:
    """The result for a Linear that saw no input."""
    n = in_features
    return LinearStats(
        input_sq=torch.zeros(n, dtype=_F64, device=device) if "input_sq" in needs else None,
        hessian_sum=torch.zeros(n, n, dtype=_F64, device=device) if "hessian" in needs else None,
        last_inputs=torch.zeros(0, n, device=device) if "last_token" in needs else None,
    )


class LinearInputCollector:
    """The per-Linear statistics that :func:`attach_linear_statistics` fills; :meth:`compute` gives the results.

    Linears called on the very same input tensor (q/k/v, gate/up) share one metric, that of the first one called
    (the owner); the others get a clone of its result. The previous hook's input is held (until :meth:`compute`),
    so an ``is`` match cannot be a recycled object.

    Args:
        linears: ``{name: Linear}`` to collect from.
        needs: validated statistics names (a subset of :data:`NEEDS`).
        current: read at each call for the batch's padding mask (``current["attention_mask"]``).
        **kwargs: passed to every :class:`LinearInputStatistics`.
    """

    def __init__(
        self,
        linears: Mapping[str, nn.Linear],
        needs: frozenset[str],
        current: Mapping[str, Tensor | None],
        **kwargs: Any,
    ) -> None:
        self.linears = dict(linears)
        self.needs = needs
        self.metrics: dict[str, LinearInputStatistics] = {}  # owners only, created at their first call
        self.shares: dict[str, str] = {}  # linear name -> the owner whose input it shares
        self._current = current
        self._kwargs = kwargs
        self._x: Tensor | None = None
        self._owner: str | None = None

    def hook(self, name: str) -> Callable[..., None]:
        """The forward pre-hook of Linear ``name``."""

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            if x is self._x and self._owner is not None:
                if self._owner != name:
                    self.shares[name] = self._owner
                return
            self._x, self._owner = x, name
            metric = self.metrics.get(name)
            if metric is None:
                metric = LinearInputStatistics(self.linears[name].in_features, self.needs, x.device, **self._kwargs)
                self.metrics[name] = metric
            metric.update(x, self._current["attention_mask"])

        return pre_hook

    def compute(self) -> dict[str, LinearStats]:
        """``{linear name: LinearStats}`` in the order of ``linears``, reduced over the ranks (see the metric).

        Under DDP every rank must call it, with the same Linears called. A Linear never called gets zero sums.

        Raises:
            RuntimeError: if a Linear shared another's input in some calls and had inputs of its own in others.
        """
        self._x, self._owner = None, None
        mixed = sorted(set(self.shares) & set(self.metrics))
        if mixed:
            raise RuntimeError(f"Linears {mixed} shared another Linear's input in some calls only")
        owned = {name: metric.compute() for name, metric in self.metrics.items()}
        results: dict[str, LinearStats] = {}
        for name, lin in self.linears.items():
            if name in owned:
                results[name] = owned[name]
            elif name in self.shares:
                results[name] = owned[self.shares[name]].clone()  # criteria may treat them independently
            else:
                results[name] = _zero_stats(lin.in_features, self.needs, lin.weight.device)
        return results


def attach_linear_statistics(
    hooks: Hooks,
    linears: Mapping[str, nn.Linear],
    needs: Iterable[str],
    current: Mapping[str, Tensor | None],
    **kwargs: Any,
) -> LinearInputCollector:
    """Register, through ``hooks``, forward pre-hooks on ``linears`` that fill :class:`LinearInputStatistics`.

    The caller runs the forwards, setting ``current["attention_mask"]`` (``(B, T)`` or None) before each batch,
    removes the hooks (leaves the ``Hooks`` context), then calls :meth:`LinearInputCollector.compute`.

    Args:
        hooks: owns the pre-hooks.
        linears: ``{name: Linear}`` to collect from.
        needs: a non-empty subset of ``("hessian", "input_sq", "last_token")``.
        current: read at each call for the batch's padding mask.
        **kwargs: passed to every :class:`LinearInputStatistics` (e.g. ``sync_on_compute=False``).

    Returns:
        The collector; its :meth:`~LinearInputCollector.compute` gives ``{name: LinearStats}``.

    Raises:
        ValueError: if ``needs`` is empty or names something unknown.
    """
    collector = LinearInputCollector(linears, _check_names("needs", needs, NEEDS), current, **kwargs)
    for name, lin in linears.items():
        hooks.forward_pre(lin, collector.hook(name))
    return collector
