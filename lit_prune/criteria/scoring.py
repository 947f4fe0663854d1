"""Collect, then score: the criteria package's only code that runs a calibration pass.

The criteria in :mod:`lit_prune.criteria.depth` and :mod:`lit_prune.criteria.width` are pure functions of
statistics. :func:`score_blocks` and :func:`score_width` are the convenience on top: they ask the registry what a
criterion needs, collect exactly that in ONE :func:`~lit_prune.stats.collect_statistics` pass (none for data-free
criteria), and score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.arch import adapter_for
from lit_prune.criteria import registry
from lit_prune.criteria.depth import _config
from lit_prune.criteria.depth_config import DepthConfig
from lit_prune.criteria.registry import ScoreInputs
from lit_prune.criteria.width import WidthScores, width_needs_for
from lit_prune.criteria.width_config import WidthConfig
from lit_prune.stats import Batches, WidthStats, collect_width_statistics
from lit_prune.stats.collect import StatisticsRequest, collect_statistics
from lit_prune.stats.linear import LinearStats

log = logging.getLogger(__name__)


def score_blocks(
    model: nn.Module,
    batches: Batches,
    criterion: str | None = None,
    *,
    config: DepthConfig | None = None,
    n: int | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Score every block of ``model`` with ``criterion``, collecting what it needs in as few passes as possible.

    One :func:`~lit_prune.stats.collect_statistics` pass serves every criterion involved: the depth statistics of
    the one-pass criteria and, when a global criterion is involved, the per-candidate replay after each batch's
    forward. Under DDP the statistics are summed over ranks, so every rank gets the same scores.

    The options are a :class:`~lit_prune.criteria.depth_config.DepthConfig` (shared with
    :class:`~lit_prune.callbacks.DepthPruning`): pass one as ``config``, or its fields as keywords, which replace
    the config's (or the defaults'), e.g. ``score_blocks(model, batches, "consensus", consensus_of=["bi", "cka"])``.

    Args:
        model: a Hugging Face causal LM (or a wrapper around one).
        batches: calibration batches (see :func:`~lit_prune.stats.collect_depth_statistics`), iterated once.
        criterion: the config's ``criterion``, one of :data:`DEPTH_CRITERIA` (None: keep the config's, by default
            ``bi``).
        config: the options; None: the defaults.
        n: the window length of ``angular_block``; None: the config's count of blocks to remove
            (:meth:`~lit_prune.criteria.depth_config.DepthConfig.num_to_remove`) when it has one, else 1.
        max_batches: use at most this many batches (None: all).
        progress: show progress bars.
        device: where to run; default the model's current device.
        **options: any other ``DepthConfig`` field: ``consensus_of`` (the members of ``consensus``, default the
            one-pass criteria), ``reversed_of`` (what ``reversed`` negates), ``seed`` (of ``random``), ...

    Returns:
        ``{criterion: scores}`` plus every component score computed on the way (e.g. ``bi``, ``angular`` and
        ``cka`` for the default ``consensus``), each ``(L,)`` float64, higher = more important.

    Raises:
        ValueError: if ``criterion``, ``consensus_of``, ``reversed_of`` or ``n`` is invalid, or the batches are.
        TypeError: for a keyword that is not a ``DepthConfig`` field.
    """
    cfg = _config(config, criterion, options)
    of = cfg.members
    components = registry.components("depth", cfg.criterion, of)
    num_blocks = adapter_for(model).num_blocks(model)
    if n is None:
        n = cfg.num_to_remove(num_blocks) if cfg.has_count else 1
    if "angular_block" in components and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_blocks):
        raise ValueError(f"`n` must be an int in 1..{num_blocks} (the number of blocks), got {n!r}")
    needs = registry.needs("depth", cfg.criterion, of)
    global_metrics = registry.needs("depth", cfg.criterion, of, global_pass=True)
    stats = gstats = None
    if needs or global_metrics:
        request = StatisticsRequest(depth=needs, candidates=global_metrics)
        collected = collect_statistics(
            model, batches, request, max_batches=max_batches, progress=progress, device=device
        )
        stats, gstats = collected.depth, collected.candidates
    inputs = ScoreInputs(stats=stats, global_stats=gstats, num_blocks=num_blocks, n=n, seed=cfg.seed)
    scores: dict[str, Tensor] = {k: v.cpu() for k, v in registry.compute("depth", cfg.criterion, inputs, of).items()}
    log.debug("Depth scores (%s): %s", cfg.criterion, {k: [round(v, 4) for v in s.tolist()] for k, s in scores.items()})
    return scores


def score_width(
    model: nn.Module,
    batches: Batches | None,
    criterion: str | None = None,
    *,
    config: WidthConfig | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    **options: Any,
) -> WidthScores:
    """Score every query head and MLP neuron of ``model`` with ``criterion``.

    At most one :func:`~lit_prune.stats.collect_width_statistics` pass runs, collecting only what the criterion
    needs (nothing for ``magnitude`` and ``random``, whose ``batches`` may be None). Under DDP the statistics are
    summed over ranks, so every rank gets the same scores (every rank must call this).

    The options are a :class:`~lit_prune.criteria.width_config.WidthConfig` (shared with
    :class:`~lit_prune.callbacks.WidthPruning` and :func:`~lit_prune.allocation.make_width_plan`): pass one as
    ``config``, or its fields as keywords, which replace the config's (or the defaults').

    Args:
        model: a Hugging Face causal LM (or a PEFT / Lightning wrapper around one).
        batches: calibration batches (see :func:`~lit_prune.stats.collect_width_statistics`); may be None for the
            data-free criteria.
        criterion: the config's ``criterion``, one of :data:`WIDTH_CRITERIA` (None: keep the config's, by default
            ``amp``).
        config: the options; None: the defaults.
        max_batches: use at most this many batches (None: all).
        progress: show a progress bar.
        device: where to run the pass; default the model's current device.
        **options: any other ``WidthConfig`` field read here: ``reversed_of`` (what ``reversed`` negates, any but
            ``reversed``), ``seed`` (of ``random``).

    Returns:
        Per-block scores, float32 on CPU, higher = more important.

    Raises:
        ValueError: if ``criterion`` or ``reversed_of`` is unknown, the criterion needs data and ``batches`` is
            None, or the batches are invalid.
        TypeError: for a keyword that is not a ``WidthConfig`` field.
    """
    cfg = WidthConfig.build(config, **({"criterion": criterion} if criterion is not None else {}), **options)
    needs = width_needs_for(cfg.criterion, reversed_of=cfg.reversed_of)
    stats = None
    if needs:
        stats = collect_width_statistics(model, _require_batches(cfg, batches), needs, max_batches, progress, device)
    return _width_scores(model, stats, cfg)


def score_width_with_grams(
    model: nn.Module,
    batches: Batches,
    linears: Sequence[str],
    *,
    config: WidthConfig | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> tuple[WidthScores, dict[str, LinearStats]]:
    """:func:`score_width` plus the input Grams of ``linears`` (what a reconstruction refits), from ONE pass.

    Returns:
        The scores, and ``{Linear name: LinearStats}`` with ``hessian_sum`` (``Σ x xᵀ``, float64) for each of
        ``linears``.

    Raises:
        ValueError: as :func:`score_width`, or if a name is not a prunable Linear of the model.
    """
    cfg = WidthConfig.build(config)
    needs = width_needs_for(cfg.criterion, reversed_of=cfg.reversed_of)
    request = StatisticsRequest(width=needs, linear={"hessian"}, linears=linears)
    data = _require_batches(cfg, batches)
    collected = collect_statistics(model, data, request, max_batches=max_batches, progress=progress, device=device)
    assert collected.linear is not None  # noqa: S101  # asked for
    return _width_scores(model, collected.width, cfg), collected.linear


def _require_batches(cfg: WidthConfig, batches: Batches | None) -> Batches:
    if batches is None:
        base = cfg.reversed_of if cfg.criterion == "reversed" else cfg.criterion
        raise ValueError(f"Criterion {base!r} needs calibration `batches`, got None")
    return batches


def _width_scores(model: nn.Module, stats: WidthStats | None, cfg: WidthConfig) -> WidthScores:
    """The config's criterion on ``stats`` (None for the data-free criteria)."""
    inputs = ScoreInputs(stats=stats, model=model, seed=cfg.seed)
    scores: WidthScores = registry.compute("width", cfg.criterion, inputs, {"reversed": cfg.reversed_of})[cfg.criterion]
    log.debug(
        "Width scores (%s) of %d blocks: %d heads, %d neurons",
        cfg.criterion,
        scores.num_blocks,
        sum(h.numel() for h in scores.heads),
        sum(n.numel() for n in scores.neurons),
    )
    return scores
