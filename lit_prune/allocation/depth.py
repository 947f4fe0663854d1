"""Depth allocation: which blocks a depth plan removes, from per-block scores (the model is only read).

:func:`make_depth_plan` ranks blocks by score and records how close the decision was (:func:`decision_margin`),
warning when few calibration windows make a near tie likely to change with another sample. The plan is applied by
:func:`lit_prune.surgery.apply_plan`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_prune.arch import adapter_for
from lit_prune.criteria.depth_config import DepthConfig
from lit_prune.plan import PruningPlan, _as_index, _checked_indices

log = logging.getLogger(__name__)

MIN_CALIBRATION_WINDOWS = 16
"""Fewer calibration windows than this make a pruning decision warn that it may change with another sample (on
SmolLM2-135M, consensus over 8 windows of 256 tokens picked other blocks for 2 of 3 seeds than over 32)."""

NEAR_TIE_MARGIN = 0.05
"""A depth plan warns when the score gap between the last removed and the first kept block is below this fraction
of the candidates' interquartile range (a near tie: another sample easily swaps them). Measured on SmolLM2-135M
(remove 6 of 30): consensus over 8 windows gave 0.024-0.03 where it changed blocks, 0.08-0.32 where it did not."""


def _checked_scores(scores: torch.Tensor | Sequence[float], num_blocks: int) -> list[float]:
    """Scores as floats, one per block and finite; ``ValueError`` says what is wrong."""
    if isinstance(scores, torch.Tensor):
        if scores.dim() != 1:
            raise ValueError(f"`scores` must be 1-D (one score per block), got shape {tuple(scores.shape)}")
        values = [float(s) for s in scores.detach().cpu().double().tolist()]
    else:
        try:
            values = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise ValueError(f"`scores` must be a sequence of numbers, got {scores!r}") from None
    if len(values) != num_blocks:
        raise ValueError(f"`scores` must hold one score per block ({num_blocks}), got {len(values)}")
    not_finite = [i for i, s in enumerate(values) if not math.isfinite(s)]
    if not_finite:
        raise ValueError(f"`scores` must be finite, got {[values[i] for i in not_finite]} at blocks {not_finite}")
    return values


def make_depth_plan(
    model: nn.Module,
    scores: torch.Tensor | Sequence[float],
    num_remove: int | None = None,
    protect: Iterable[int] | None = None,
    method: str = "",
    meta: dict[str, Any] | None = None,
    calibration_windows: int | None = None,
    *,
    config: DepthConfig | None = None,
) -> PruningPlan:
    """Choose the ``num_remove`` least important unprotected blocks; the model is only read, never modified.

    Blocks are ranked by score (higher = more important) and the lowest go. Ties are broken towards the deeper
    block (the higher index is removed first): deep blocks are the usual redundant ones in LLMs (Gromov et al.,
    Men et al.), and the rule makes plans deterministic whatever order the scores were computed in.

    Args:
        model: the model the plan is for (as for :func:`remove_blocks`).
        scores: one score per block, 1-D.
        num_remove: how many blocks to remove; 1 to the number of unprotected blocks, and at least one block must
            remain. None: the config's ``num_layers`` or ``amount`` × blocks.
        protect: indices of blocks never removed (e.g. ``(0, num_blocks - 1)``); None: the config's (by default
            none).
        method: recorded in the plan, e.g. ``"depth:bi"``.
        meta: provenance recorded in the plan (copied); ``protect`` is added when not empty.
        calibration_windows: how many calibration windows the scores were computed on; None when they do not come
            from calibration data (``random``) or the count is unknown. When given, the plan records it and its
            :func:`decision_margin` in ``meta``, and a ``UserWarning`` says that the chosen blocks may change with
            another sample when fewer than :data:`MIN_CALIBRATION_WINDOWS` windows were used or the margin between
            the last removed and the first kept block is below :data:`NEAR_TIE_MARGIN` of the scores' spread.
        config: the depth options (:class:`~lit_prune.criteria.depth_config.DepthConfig`, shared with
            :class:`~lit_prune.callbacks.DepthPruning` and :func:`~lit_prune.criteria.scoring.score_blocks`), read for
            ``num_remove`` and ``protect`` when those are None; None: the defaults.

    Returns:
        The plan, with parameter counts before and after computed from the current model.

    Raises:
        ValueError: if ``scores`` is not 1-D with one finite score per block, if ``protect`` holds an index outside
            ``[0, num_blocks)`` or a non-integer, or if ``num_remove`` is not an int in the allowed range (or is
            None and the config gives no count).
        TypeError: if ``meta`` is not a dict or ``config`` not a ``DepthConfig``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> plan = make_depth_plan(model, [0.9, 0.1, 0.1, 0.2], num_remove=2, protect=[3], method="depth:bi")
        >>> plan.drop_layers, plan.num_layers
        ((1, 2), 4)
    """
    cfg = DepthConfig.build(config)
    adapter = adapter_for(model)
    block_params = adapter.block_params(model)
    num_blocks = len(block_params)
    values = _checked_scores(scores, num_blocks)
    if num_remove is None:
        num_remove = cfg.num_to_remove(num_blocks)
    if protect is None:
        protect = cfg.protect
    protected = sorted(set(_checked_indices(list(protect), num_blocks, name="protect")))
    max_remove = min(num_blocks - len(protected), num_blocks - 1)
    remove_count = _as_index(num_remove)
    if remove_count is None or not 1 <= remove_count <= max_remove:
        raise ValueError(
            f"`num_remove` must be an int in [1, {max_remove}]: the model has {num_blocks} blocks, "
            f"{len(protected)} protected ({protected}), and at least one must remain; got {num_remove!r}"
        )
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"`meta` must be a dict or None, got {type(meta).__name__}")
    windows = None if calibration_windows is None else _as_index(calibration_windows)
    if calibration_windows is not None and (windows is None or windows < 1):
        raise ValueError(f"`calibration_windows` must be None or an int >= 1, got {calibration_windows!r}")

    candidates = [i for i in range(num_blocks) if i not in protected]
    candidates.sort(key=lambda i: (values[i], -i))  # lowest score first; on ties the deeper block first
    drop = sorted(candidates[:remove_count])

    removed = sum(block_params[i] for i in drop)
    total, non_embedding = adapter.total_params(model), adapter.non_embedding_params(model)
    plan_meta = dict(meta or {})
    if protected:
        plan_meta.setdefault("protect", protected)
    margin = None
    if windows is not None and remove_count < len(candidates):
        margin = decision_margin(values, candidates, remove_count)
        plan_meta["calibration_windows"] = windows
        plan_meta["decision_margin"] = margin
    plan = PruningPlan(
        drop_layers=tuple(drop),
        num_layers=num_blocks,
        method=method,
        params_before=total,
        params_after=total - removed,
        non_embedding_before=non_embedding,
        non_embedding_after=non_embedding - removed,
        scores=tuple(values),
        meta=plan_meta,
    )
    if margin is not None and windows is not None:
        _warn_if_unstable(method or "depth", margin, windows)
    log.debug(
        "Depth plan%s: remove blocks %s of %d (the lowest-scoring); parameters %s -> %s",
        f" ({method})" if method else "",
        drop,
        num_blocks,
        f"{total:,}",
        f"{total - removed:,}",
    )
    return plan


def decision_margin(values: Sequence[float], ranked: Sequence[int], num_remove: int) -> dict[str, float | int]:
    """How close the call between the last removed and the first kept block was.

    Args:
        values: one score per block (higher = more important).
        ranked: the candidate blocks, lowest score first (the first ``num_remove`` are removed).
        num_remove: how many are removed; ``ranked`` must hold more.

    Returns:
        ``last_removed`` / ``first_kept`` (block indices) with their scores, ``gap`` (the kept score minus the
        removed one, >= 0), ``spread`` (the interquartile range of the candidates' scores, or their range when
        that is 0: robust to the few outlying first / last blocks that dominate the range of real scores) and
        ``relative`` = gap / spread (0 when every candidate scores the same).
    """
    last, first = ranked[num_remove - 1], ranked[num_remove]
    scores = torch.tensor([values[i] for i in ranked], dtype=torch.float64)
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    spread = q3 - q1 if q3 > q1 else float(scores.max() - scores.min())
    gap = values[first] - values[last]
    return {
        "last_removed": last,
        "last_removed_score": values[last],
        "first_kept": first,
        "first_kept_score": values[first],
        "gap": gap,
        "spread": spread,
        "relative": gap / spread if spread > 0 else 0.0,
    }


def _warn_if_unstable(method: str, margin: dict[str, float | int], windows: int) -> None:
    """Warn when the chosen blocks may change with another calibration sample (see :data:`NEAR_TIE_MARGIN`)."""
    reasons = []
    if windows < MIN_CALIBRATION_WINDOWS:
        reasons.append(f"only {windows} calibration windows (fewer than {MIN_CALIBRATION_WINDOWS})")
    if margin["relative"] < NEAR_TIE_MARGIN:
        reasons.append(f"a near tie (margin below {NEAR_TIE_MARGIN:.0%} of the scores' interquartile range)")
    if not reasons:
        return
    rank_zero_warn(
        f"Depth plan ({method}): the removed blocks may change with another calibration sample: "
        f"{' and '.join(reasons)}. The last block removed ({margin['last_removed']}, score "
        f"{margin['last_removed_score']:.4g}) and the first kept ({margin['first_kept']}, score "
        f"{margin['first_kept_score']:.4g}) are {margin['gap']:.3g} apart, {100 * margin['relative']:.1f}% of the "
        "interquartile range of the candidates' scores. Score on more calibration windows (32 or more, e.g. the "
        "datamodule's `calibration_windows: 64`) and check that the removed blocks stay the same.",
        category=UserWarning,
    )
