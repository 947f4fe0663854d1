"""``apply_plan``: the one function that changes a model from a :class:`~lit_prune.plan.PruningPlan`.

Width changes (heads, neurons) first, with the least-squares refits a ``reconstruction`` record asks for
(:mod:`lit_prune.surgery.reconstruct`, computed before the cut), then the dropped blocks; everything is validated
before anything changes. A sparsity plan re-computes its masks on the calibration it was made on
(:func:`lit_prune.sparse.replay_sparsity`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import Tensor, nn

from lit_prune.arch import adapter_for
from lit_prune.plan import PruningPlan, _checked_indices
from lit_prune.sparse.prune import replay_sparsity
from lit_prune.stats._common import Batches
from lit_prune.stats.linear import LinearStats
from lit_prune.surgery.config import block_shapes, sync_config
from lit_prune.surgery.depth import _check_config_depth, remove_blocks
from lit_prune.surgery.reconstruct import assign_refits, plan_refits
from lit_prune.surgery.width import check_width_keep, prune_heads, prune_neurons

log = logging.getLogger(__name__)


def apply_plan(
    model: nn.Module,
    plan: PruningPlan,
    calibration: Batches | None = None,
    *,
    statistics: Mapping[str, LinearStats | Tensor] | None = None,
    reconstruct: bool = True,
    progress: bool = False,
) -> None:
    """Apply ``plan`` to ``model`` in place: first its width changes (heads, neurons), then its ``drop_layers``.

    A sparsity plan (``plan.sparsity``) changes no shape: its masks are re-computed with the recorded
    :class:`~lit_prune.sparse.config.SparsityConfig` on ``calibration``, which must be the calibration the plan was
    made on (the plan holds a digest of its tokens), and must come out as recorded (the sparsity of every Linear, and
    the masks' digest): same calibration, method and model give the same masks (and SparseGPT's same weights).

    Args:
        model: the model to prune (as for :func:`remove_blocks`).
        plan: a plan made on a model of the same shape as ``model`` is now (depth, and the per-block widths
            ``heads_before`` / ``neurons_before`` when the plan records them).
        calibration: for a sparsity plan, the calibration batches it was made on (dicts with ``input_ids``, e.g. the
            datamodule's ``calibration_dataloader()``); not needed by ``magnitude`` with ``uniform`` / ``linear_map``
            allocation and no TRIM. For a plan with a ``reconstruction`` record, the batches its refits were made on
            (their Grams are collected there, on the model before the cut) unless ``statistics`` are given.
        statistics: ``{Linear name: LinearStats with hessian_sum}`` (or the Gram tensors) of the Linears a
            ``reconstruction`` refits, e.g. from the scoring pass, instead of collecting them on ``calibration``.
        reconstruct: False applies a ``reconstruction`` plan's shapes only (the weights then come from elsewhere,
            e.g. a checkpoint being loaded).
        progress: show progress bars while a sparsity plan calibrates.

    Raises:
        TypeError: if ``plan`` is not a :class:`~lit_prune.plan.PruningPlan`, or a projection to cut is not a plain
            ``nn.Linear`` (merge LoRA adapters first).
        ValueError: if the plan was made for a model of another depth or other widths, or its indices do not fit
            (see :func:`remove_blocks`, :func:`lit_prune.surgery.prune_heads`). Nothing is modified when it
            raises, except in one case: a sparsity plan whose re-computed masks differ from the record (the
            calibration matched, so the model's weights or the numerics differ) leaves the model pruned with the
            new masks and says so (reload the model to undo). A sparsity plan without its calibration, on other
            calibration or on a model with other Linears or masks is refused before any change, and so is a
            sparsity plan of format version 2 (it records no config to replay).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> apply_plan(model, PruningPlan(drop_layers=(1,), num_layers=3))
        >>> model.config.num_hidden_layers
        2
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(f"`plan` must be a PruningPlan, got {type(plan).__name__}")
    if plan.method.startswith("sparsity") and plan.sparsity is None:
        raise ValueError(
            f"The plan ({plan.method}) is a sparsity plan without a `sparsity` record (plan format version 2 or "
            "hand-written): it records how much of each block was zeroed, not how, so there is nothing to replay; "
            "run its SparsityPruning config again. Nothing was modified"
        )
    adapter = adapter_for(model)
    num_blocks = adapter.num_blocks(model)
    if plan.num_layers is not None and plan.num_layers != num_blocks:
        raise ValueError(
            f"The plan was made for a model with {plan.num_layers} blocks, this one has {num_blocks}; "
            f"nothing was modified (was the plan already applied?)"
        )
    drop = _checked_indices(plan.drop_layers, num_blocks, name="drop_layers")
    if len(drop) == num_blocks:
        raise ValueError(f"The plan removes all {num_blocks} blocks; at least one block must remain")
    _check_config_depth(adapter.config(model), num_blocks)
    if plan.changes_width:
        _check_widths_before(model, plan)
        check_width_keep(model, plan.keep_heads or {}, plan.keep_neurons or {})
    log.debug("Applying %r", plan)
    refits = plan_refits(model, plan, calibration, statistics, progress=progress) if reconstruct else {}
    if plan.sparsity is not None:  # no shape changes (PruningPlan refuses a sparsity plan that has some)
        replay_sparsity(model, plan.sparsity, calibration, progress=progress)
        return
    if plan.changes_width:
        for block, keep in (plan.keep_heads or {}).items():
            prune_heads(model, block, keep)
        for block, keep in (plan.keep_neurons or {}).items():
            prune_neurons(model, block, keep)
        assign_refits(model, refits)  # names are still the plan's: blocks are dropped below
        sync_config(model)
    remove_blocks(model, plan.drop_layers)


def _check_widths_before(model: nn.Module, plan: PruningPlan) -> None:
    """Raise unless the model's per-block widths are the ones the plan was made on (when the plan records them)."""
    shapes = block_shapes(model)
    for name, recorded, current in (
        ("heads_before", plan.heads_before, tuple(s.num_attention_heads for s in shapes)),
        ("neurons_before", plan.neurons_before, tuple(s.intermediate_size for s in shapes)),
    ):
        if recorded is not None and tuple(recorded) != current:
            raise ValueError(
                f"The plan was made for a model with per-block widths {name}={list(recorded)}, this one has "
                f"{list(current)}; nothing was modified (was the plan already applied?)"
            )
