"""Every statistic a set of criteria needs, from ONE pass of the pass driver.

A :class:`StatisticsRequest` names what to collect (depth, width, per-candidate and per-Linear statistics);
:func:`collect_statistics` attaches all their hooks to one :func:`~lit_prune.stats.engine.run_pass` and returns the
reduced sums. The criteria's registry says what each criterion needs (:func:`~lit_prune.criteria.registry.needs`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_prune.arch import adapter_for, base_layer, block_linears, unwrap
from lit_prune.stats._common import _F64, Batches, _check_names
from lit_prune.stats.candidates import GLOBAL_METRICS, CandidateReplay, GlobalStats
from lit_prune.stats.depth import DEPTH_NEEDS, DepthStats, attach_depth_statistics
from lit_prune.stats.engine import Attach, run_pass
from lit_prune.stats.linear import NEEDS, LinearStats, attach_linear_statistics
from lit_prune.stats.width import (
    SQUARE_OF,
    WIDTH_NEEDS,
    WidthStats,
    attach_width_statistics,
    site_modules,
    width_shapes,
)


def _names(name: str, values: Any, allowed: tuple[str, ...]) -> frozenset[str]:
    return frozenset() if not values else _check_names(name, values, allowed)


@dataclass(frozen=True)
class StatisticsRequest:
    """What one calibration pass collects; each part is a subset of its statistics' needs (empty: not collected).

    Parts are stored as frozensets (any collection of names is accepted).

    Args:
        depth: :data:`~lit_prune.stats.DEPTH_NEEDS` (block inputs/outputs: Block Influence, angular, CKA).
        width: :data:`~lit_prune.stats.WIDTH_NEEDS` (per head and neuron).
        candidates: :data:`~lit_prune.stats.GLOBAL_METRICS` (the model without each block, replayed per batch).
        linear: :data:`~lit_prune.stats.linear.NEEDS` (every prunable Linear's input sums: sparsity, reconstruction).
        linears: the names of the prunable Linears ``linear`` is collected from (None: all of them), e.g. the
            ``o_proj`` / ``down_proj`` a reconstruction refits (:func:`~lit_prune.surgery.reconstruct.reader_linears`).

    Raises:
        ValueError: if a part names something its statistics cannot collect, or nothing is asked at all.
    """

    depth: Iterable[str] = field(default_factory=frozenset)
    width: Iterable[str] = field(default_factory=frozenset)
    candidates: Iterable[str] = field(default_factory=frozenset)
    linear: Iterable[str] = field(default_factory=frozenset)
    linears: Iterable[str] | None = None

    def __post_init__(self) -> None:
        parts = (("depth", DEPTH_NEEDS), ("width", WIDTH_NEEDS), ("candidates", GLOBAL_METRICS), ("linear", NEEDS))
        for name, allowed in parts:
            object.__setattr__(self, name, _names(name, getattr(self, name), allowed))
        if self.linears is not None:
            if isinstance(self.linears, str):
                raise ValueError(f"`linears` must be a collection of Linear names, got the string {self.linears!r}")
            object.__setattr__(self, "linears", frozenset(self.linears))
        if not (self.depth or self.width or self.candidates or self.linear):
            raise ValueError(
                "The StatisticsRequest asks for nothing: name at least one depth, width, candidates or linear need"
            )


@dataclass(frozen=True)
class Statistics:
    """The reduced sums of one pass (summed over DDP ranks); the parts not requested are None."""

    depth: DepthStats | None = None
    width: WidthStats | None = None
    candidates: GlobalStats | None = None
    linear: dict[str, LinearStats] | None = None


def collect_statistics(
    model: nn.Module,
    batches: Batches,
    request: StatisticsRequest,
    *,
    max_batches: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    sync: bool = True,
) -> Statistics:
    """Collect everything ``request`` names in one pass over ``batches`` (decoder only, no LM head unless ``kl``).

    The depth and width hooks see the reference forward; the per-candidate replay runs after it with those hooks
    paused, so the sums equal those of separate passes. ``sync=False`` keeps every part at this rank's own sums
    (default: summed over DDP ranks).

    Raises:
        ValueError: if the request cannot be served by the model (``kl`` without an LM head), or the batches are
            invalid.
    """
    kw: dict[str, Any] = {"sync_on_compute": sync}
    hf_model = unwrap(model)
    replay = CandidateReplay(hf_model, request.candidates, **kw) if request.candidates else None
    sources = _square_sources(hf_model, request.linears) if request.width and "input_sq" in request.linear else None
    shared = frozenset(request.width) & frozenset(SQUARE_OF.values()) if sources is not None else frozenset()
    width_needs = frozenset(request.width) - shared  # the squares both ask for are summed once, by the Linears
    attach: dict[str, Attach] = {}
    if request.depth:
        attach["depth"] = lambda hf_model, hooks, current: attach_depth_statistics(
            hf_model, request.depth, hooks, current, **kw
        )
    if width_needs:
        attach["width"] = lambda hf_model, hooks, current: attach_width_statistics(
            hf_model, width_needs, hooks, current, **kw
        )
    if request.linear:
        linears = _requested_linears(hf_model, request.linears)
        attach["linear"] = lambda hf_model, hooks, current: attach_linear_statistics(
            hooks, linears, request.linear, current, **kw
        )
    if replay is not None:
        attach["candidates"] = lambda hf_model, hooks, current: replay.attach(hooks)
    out = run_pass(
        model,
        batches,
        attach,
        on_batch=None if replay is None else replay.on_batch,
        max_batches=max_batches,
        progress=progress,
        device=device,
        desc="calibration statistics",
    )
    linear = out["linear"].compute() if "linear" in out else None
    width = out["width"].compute() if "width" in out else None
    if shared and linear is not None and sources is not None:
        width = _with_squares(hf_model, width, linear, sources, shared)
    return Statistics(
        depth=out["depth"].compute() if "depth" in out else None,
        width=width,
        candidates=out["candidates"].metric.compute() if "candidates" in out else None,
        linear=linear,
    )


def _requested_linears(hf_model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Linear]:
    """``{name: Linear}`` of the prunable Linears ``names`` asks for (all when None); unknown names are refused."""
    every = {name: lin for block in block_linears(hf_model) for name, lin in block.items()}
    if names is None:
        return every
    unknown = sorted(set(names) - set(every))
    if unknown:
        raise ValueError(
            f"`linears` names {unknown[:4]}{' ...' if len(unknown) > 4 else ''}, which are not prunable Linears of "
            f"this model; e.g. {list(every)[:3]}"
        )
    return {name: lin for name, lin in every.items() if name in set(names)}


def _square_sources(hf_model: nn.Module, names: Iterable[str] | None) -> list[dict[str, str]] | None:
    """Per block, ``{square need: the Linear whose input_sq is that sum}``; None if a site is not a collected Linear."""
    adapter = adapter_for(hf_model)
    allowed = None if names is None else frozenset(names)
    sources: list[dict[str, str]] = []
    for attn, mlp, linears in zip(
        adapter.attentions(hf_model), adapter.mlps(hf_model), block_linears(hf_model), strict=True
    ):
        name_of = {id(linear): name for name, linear in linears.items()}
        per_site: dict[str, str] = {}
        for site, module in site_modules(attn, mlp).items():
            name = name_of.get(id(base_layer(module)))
            if name is None or (allowed is not None and name not in allowed):
                return None
            per_site[SQUARE_OF[site]] = name
        sources.append(per_site)
    return sources


def _with_squares(
    hf_model: nn.Module,
    width: WidthStats | None,
    linear: dict[str, LinearStats],
    sources: list[dict[str, str]],
    shared: frozenset[str],
) -> WidthStats:
    """``width`` (or the model's empty width sums) with the ``shared`` squares read from the per-Linear sums.

    The width hooks compute the squares with the very formula of ``input_sq`` (``_f64_chunks``), so the result is
    bit-identical to a pass that collected them separately.
    """
    sums: dict[str, tuple[torch.Tensor, ...] | None] = {}
    if width is not None:
        sums = {name: getattr(width, name) for name in WIDTH_NEEDS}
    for need in shared:
        sums[need] = tuple(linear[names[need]].input_sq.clone() for names in sources)  # type: ignore[union-attr]
    if width is not None:
        return WidthStats(width.heads, width.neurons, width.head_dim, width.hidden_size, width.count, **sums)
    first = next(need for need in SQUARE_OF.values() if need in shared)  # tokens counted at the first site
    counts = [float(linear[names[first]].count) for names in sources]
    device = sums[first][0].device  # type: ignore[index]
    count = torch.tensor(counts, dtype=_F64, device=device)
    heads, neurons, head_dim, hidden_size = width_shapes(hf_model)
    return WidthStats(heads, neurons, head_dim, hidden_size, count, **sums)
