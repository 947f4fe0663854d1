"""Structural surgery: apply a :class:`~lit_prune.plan.PruningPlan` to a model so real tensors go away.

Depth surgery removes whole blocks in place (the Trainer and the LightningModule keep holding the same model object)
and keeps everything that counts blocks consistent with the new depth:

* the decoder's block list is a new ``nn.ModuleList`` of the surviving blocks, in order;
* the (text) config: ``num_hidden_layers``; the per-layer lists in :data:`PER_LAYER_CONFIG_ATTRS` (``layer_types``
  of sliding-window models, ...) lose the removed entries; ``max_window_layers`` (Qwen2/Qwen3: the first layer
  index that may slide) is recounted on the surviving blocks; a heterogeneous ``per_layer_config`` is re-keyed;
* every ``layer_idx`` attribute inside a surviving block is set to its new position, so KV caches index correctly;
* cached state that depends on the depth is dropped (a ``torch.compile``'d call, ``has_sliding_layers``);
* PEFT ``layers_to_transform`` lists are renumbered, so later adapter injection targets the same blocks.

The result saves with ``save_pretrained`` and reloads with plain ``AutoModelForCausalLM.from_pretrained``.
Every argument is validated before anything is modified: a failing call leaves the model as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_prune.arch import adapter_for, model_config, unwrap
from lit_prune.plan import PruningPlan, _as_index
from lit_prune.shapes import block_shapes, sync_config
from lit_prune.width_surgery import check_width_keep, prune_heads, prune_neurons

log = logging.getLogger(__name__)

MIN_CALIBRATION_WINDOWS = 16
"""Fewer calibration windows than this make a pruning decision warn that it may change with another sample (on
SmolLM2-135M, consensus over 8 windows of 256 tokens picked other blocks for 2 of 3 seeds than over 32)."""

NEAR_TIE_MARGIN = 0.05
"""A depth plan warns when the score gap between the last removed and the first kept block is below this fraction
of the candidates' interquartile range (a near tie: another sample easily swaps them). Measured on SmolLM2-135M
(remove 6 of 30): consensus over 8 windows gave 0.024-0.03 where it changed blocks, 0.08-0.32 where it did not."""

PER_LAYER_CONFIG_ATTRS: tuple[str, ...] = ("layer_types", "mlp_layer_types", "no_rope_layers")
"""Config attributes holding one entry per block (when present and not None); surgery drops the removed entries.
``layer_types``: attention kind per layer (``"full_attention"``/``"sliding_attention"``, Qwen2/Qwen3/Mistral-style
configs); ``mlp_layer_types``: MLP kind per layer; ``no_rope_layers``: SmolLM3's per-layer RoPE flags."""


def _text_config(model: nn.Module) -> Any:
    """The config that describes the decoder stack (the text config of a multimodal model), or None."""
    cfg = model_config(model)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config(decoder=True)
    return cfg


def _checked_indices(indices: Iterable[int], num_blocks: int, name: str = "indices") -> list[int]:
    """Block indices as a list of ints, each in ``[0, num_blocks)`` and unique; ``ValueError`` names the bad ones."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise ValueError(f"`{name}` must be an iterable of block indices, got {indices!r}")
    values = list(indices)
    as_ints = [_as_index(v) for v in values]
    not_ints = [v for v, i in zip(values, as_ints) if i is None]
    if not_ints:
        raise ValueError(f"`{name}` must hold integer block indices, got {not_ints!r} in {values!r}")
    ints = [i for i in as_ints if i is not None]
    out_of_range = [i for i in ints if not 0 <= i < num_blocks]
    if out_of_range:
        raise ValueError(
            f"`{name}` must be in [0, {num_blocks}) (the model has {num_blocks} blocks; negative indices are not "
            f"accepted), got {out_of_range}"
        )
    duplicates = sorted({i for i in ints if ints.count(i) > 1})
    if duplicates:
        raise ValueError(f"`{name}` must not repeat a block, got {duplicates} more than once in {ints}")
    return ints


def _check_config_depth(cfg: Any, num_blocks: int) -> None:
    """Raise if a per-layer config list does not have one entry per block (surgery could not keep it right)."""
    if cfg is None:
        return
    for attr in PER_LAYER_CONFIG_ATTRS:
        values = getattr(cfg, attr, None)
        if values is not None and len(values) != num_blocks:
            raise ValueError(
                f"config.{attr} has {len(values)} entries but the model has {num_blocks} blocks; "
                f"refusing to remove blocks from an inconsistent model"
            )


def _update_config(cfg: Any, keep: list[int]) -> None:
    """Make ``cfg`` describe the surviving blocks ``keep`` (their old indices, in order)."""
    new_of_old = {old: new for new, old in enumerate(keep)}
    heterogeneity = cfg.__dict__.get("_heterogeneity_spec")
    cfg.num_hidden_layers = len(keep)
    for attr in PER_LAYER_CONFIG_ATTRS:
        values = getattr(cfg, attr, None)
        if values is not None:
            setattr(cfg, attr, type(values)(values[i] for i in keep))
    max_window = cfg.__dict__.get("max_window_layers")
    if isinstance(max_window, int) and not isinstance(max_window, bool):
        cfg.max_window_layers = sum(1 for i in keep if i < max_window)
    if heterogeneity is not None:
        overrides = {
            new_of_old[old]: dict(values)
            for old, values in heterogeneity.per_layer_overrides.items()
            if old in new_of_old
        }
        cfg.per_layer_config = overrides or None


def _peft_configs(model: nn.Module) -> list[Any]:
    """PEFT adapter configs of ``model`` and of every wrapper on the way to the HF model (each config once)."""
    found: dict[int, Any] = {}
    current: Any = model
    for _ in range(8):
        configs = getattr(current, "peft_config", None)
        if isinstance(configs, dict):
            found.update((id(c), c) for c in configs.values())
        if hasattr(current, "get_base_model") and callable(current.get_base_model):
            inner = current.get_base_model()
        elif hasattr(current, "config"):
            break
        else:
            inner = getattr(current, "model", None)
        if not isinstance(inner, nn.Module) or inner is current:
            break
        current = inner
    return list(found.values())


def _renumber_peft(model: nn.Module, new_of_old: dict[int, int]) -> None:
    """Renumber ``layers_to_transform`` of PEFT configs so they name the same (surviving) blocks."""
    for peft_cfg in _peft_configs(model):
        layers = getattr(peft_cfg, "layers_to_transform", None)
        if layers is None:
            continue
        old = [layers] if isinstance(layers, int) else list(layers)
        new = [new_of_old[i] for i in old if i in new_of_old]
        peft_cfg.layers_to_transform = new
        log.debug("PEFT layers_to_transform renumbered after block removal: %s -> %s", old, new)
        if not new:
            log.warning(
                "Every block listed in PEFT layers_to_transform %s was removed; the adapter config now lists none",
                old,
            )


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> list[int]:
    """Remove transformer blocks from ``model`` in place and keep config, ``layer_idx`` and caches consistent.

    The model object stays the same (a Trainer or a PEFT wrapper holding it sees the change); the decoder gets a
    new ``nn.ModuleList`` of the surviving blocks. See the module docstring for everything that is updated.
    Optimizers holding the removed parameters must be rebuilt by the caller.

    Args:
        model: a Hugging Face causal LM (or bare decoder), possibly inside a PEFT wrapper or a ``CausalLMModule``.
        indices: indices of the blocks to remove, in the model's current numbering. Empty removes nothing.

    Returns:
        The removed indices, sorted.

    Raises:
        ValueError: if an index is not an integer, is outside ``[0, num_blocks)`` (negative indices included), is
            repeated, or if every block would be removed; or if a per-layer config list does not match the model's
            depth. Nothing is modified when it raises.
        lit_prune.arch.UnsupportedModelError: if the model family has no adapter.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> remove_blocks(model, [2, 0])
        [0, 2]
        >>> model.config.num_hidden_layers, [b.self_attn.layer_idx for b in model.model.layers]
        (2, [0, 1])
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    num_blocks = len(blocks)
    drop = sorted(_checked_indices(indices, num_blocks))
    if len(drop) == num_blocks:
        raise ValueError(
            f"Cannot remove all {num_blocks} blocks (got `indices`={drop}); at least one block must remain"
        )
    cfg = _text_config(model)
    _check_config_depth(cfg, num_blocks)
    if not drop:
        log.debug("No blocks to remove; the model keeps its %d blocks", num_blocks)
        return []

    # --- everything below modifies the model; nothing below may raise on user input -------------------------
    params_before = adapter.total_params(model)
    dropped = set(drop)
    keep = [i for i in range(num_blocks) if i not in dropped]
    new_of_old = {old: new for new, old in enumerate(keep)}
    setattr(adapter.decoder(model), adapter.layers_attr, nn.ModuleList(blocks[i] for i in keep))

    for new_index, block in enumerate(adapter.blocks(model)):
        for module in block.modules():
            layer_idx = module.__dict__.get("layer_idx")
            if isinstance(layer_idx, int) and not isinstance(layer_idx, bool):
                setattr(module, "layer_idx", new_index)

    if cfg is not None:
        _update_config(cfg, keep)
        layer_types = getattr(cfg, "layer_types", None)
        decoder = adapter.decoder(model)
        if layer_types is not None and isinstance(decoder.__dict__.get("has_sliding_layers"), bool):
            setattr(decoder, "has_sliding_layers", "sliding_attention" in layer_types)

    hf_model = unwrap(model)
    for attr in ("_compiled_call", "_last_compile_config"):
        hf_model.__dict__.pop(attr, None)  # a torch.compile'd call traced the old depth
    _renumber_peft(model, new_of_old)
    if cfg is not None:
        sync_config(model)  # a non-uniform model's per-block width record loses the removed blocks

    params_after = adapter.total_params(model)
    log.debug(
        "Removed blocks %s: %d -> %d blocks, parameters %s -> %s (-%.1f%%)",
        drop,
        num_blocks,
        len(keep),
        f"{params_before:,}",
        f"{params_after:,}",
        100.0 * (1 - params_after / params_before) if params_before else 0.0,
    )
    return drop


def apply_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Apply ``plan`` to ``model`` in place: first its width changes (heads, neurons), then its ``drop_layers``.

    Args:
        model: the model to prune (as for :func:`remove_blocks`).
        plan: a plan made on a model of the same shape as ``model`` is now (depth, and the per-block widths
            ``heads_before`` / ``neurons_before`` when the plan records them).

    Raises:
        TypeError: if ``plan`` is not a :class:`~lit_prune.plan.PruningPlan`, or a projection to cut is not a plain
            ``nn.Linear`` (merge LoRA adapters first).
        ValueError: if the plan was made for a model of another depth or other widths, or its indices do not fit
            (see :func:`remove_blocks`, :func:`lit_prune.width_surgery.prune_heads`). Nothing is modified when it
            raises.

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
    _check_config_depth(_text_config(model), num_blocks)
    if plan.changes_width:
        _check_widths_before(model, plan)
        check_width_keep(model, plan.keep_heads or {}, plan.keep_neurons or {})
    log.debug("Applying %r", plan)
    if plan.changes_width:
        for block, keep in (plan.keep_heads or {}).items():
            prune_heads(model, block, keep)
        for block, keep in (plan.keep_neurons or {}).items():
            prune_neurons(model, block, keep)
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
    num_remove: int,
    protect: Iterable[int] = (),
    method: str = "",
    meta: dict[str, Any] | None = None,
    calibration_windows: int | None = None,
) -> PruningPlan:
    """Choose the ``num_remove`` least important unprotected blocks; the model is only read, never modified.

    Blocks are ranked by score (higher = more important) and the lowest go. Ties are broken towards the deeper
    block (the higher index is removed first): deep blocks are the usual redundant ones in LLMs (Gromov et al.,
    Men et al.), and the rule makes plans deterministic whatever order the scores were computed in.

    Args:
        model: the model the plan is for (as for :func:`remove_blocks`).
        scores: one score per block, 1-D.
        num_remove: how many blocks to remove; 1 to the number of unprotected blocks, and at least one block must
            remain.
        protect: indices of blocks never removed (e.g. ``(0, num_blocks - 1)``).
        method: recorded in the plan, e.g. ``"depth:bi"``.
        meta: provenance recorded in the plan (copied); ``protect`` is added when not empty.
        calibration_windows: how many calibration windows the scores were computed on; None when they do not come
            from calibration data (``random``) or the count is unknown. When given, the plan records it and its
            :func:`decision_margin` in ``meta``, and a ``UserWarning`` says that the chosen blocks may change with
            another sample when fewer than :data:`MIN_CALIBRATION_WINDOWS` windows were used or the margin between
            the last removed and the first kept block is below :data:`NEAR_TIE_MARGIN` of the scores' spread.

    Returns:
        The plan, with parameter counts before and after computed from the current model.

    Raises:
        ValueError: if ``scores`` is not 1-D with one finite score per block, if ``protect`` holds an index outside
            ``[0, num_blocks)`` or a non-integer, or if ``num_remove`` is not an int in the allowed range.
        TypeError: if ``meta`` is not a dict.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> plan = make_depth_plan(model, [0.9, 0.1, 0.1, 0.2], num_remove=2, protect=[3], method="depth:bi")
        >>> plan.drop_layers, plan.num_layers
        ((1, 2), 4)
    """
    adapter = adapter_for(model)
    block_params = adapter.block_params(model)
    num_blocks = len(block_params)
    values = _checked_scores(scores, num_blocks)
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
