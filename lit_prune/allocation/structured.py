"""Width allocation: turn per-head and per-neuron scores into a :class:`~lit_prune.plan.PruningPlan` under a budget.

The budget follows AMP (``METHODS.md`` §1): ``R`` parameters to remove are shared between attention and MLP in
proportion to their size, ``p = R / (N_attn + N_mlp)``, where ``N_attn`` counts every block's q/k/v/o weights and
biases and ``N_mlp`` every block's gate/up/down weights and biases.

GQA (query head ``h`` of a block belongs to KV head ``h // group_size``) is handled in one of two ways:

* ``gqa="query"``: remove the same number of query heads from every KV group of a block, the lowest-scoring ones of
  each group; k/v rows stay and every group keeps at least one head, so ``num_attention_heads / num_key_value_heads``
  stays uniform within the block. A removed head costs :meth:`~lit_prune.arch.ModelAdapter.head_params`.
* ``gqa="group"``: remove whole KV groups (group score = mean of its query heads' scores) with their query heads and
  k/v rows; a removed group costs :meth:`~lit_prune.arch.ModelAdapter.kv_group_params`; one group always stays.

Multi-head attention (``group_size == 1``) has nothing to remove inside a group, so a block with one head per group is
handled as in ``"group"`` mode whichever mode is asked: each head is its own group and goes with its k/v rows.

Two allocations:

* ``"uniform"`` (AMP): the same ratio ``p`` in every block, heads rounded to the GQA granularity, then one MLP ratio
  for every block, chosen so that the total removed is as close to ``R`` as the kept widths allow (the neurons make
  up for the head rounding).
* ``"global"``: the same attention budget (``≈ p·N_attn``) and MLP budget (``R`` minus what attention removed), spread
  over the blocks by ranking normalised scores across blocks: **scores divided by their block's mean, then ranked
  across blocks** (the mean absolute score, which is the mean for the usual non-negative scores), so that a block
  whose scores are larger overall (deep blocks, for activation-based criteria) is not spared for that alone.
  Attention units are KV groups (score: the mean of its heads) in ``"group"`` mode and "the j-th lowest head of
  every group" (score: the mean of those heads) in ``"query"`` mode, so GQA stays uniform within a block; MLP units
  are single neurons. The lowest units go first (ties: the lower block, then the lower index), each block down to
  its minimum; every MLP width is then snapped to ``round_to`` and the total re-balanced with the lowest remaining
  (or highest removed) ``round_to`` chunks across blocks.

The model is only read; the plan is applied by :mod:`lit_prune.surgery`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lit_prune._validation import check_int
from lit_prune.arch import AttentionView, MLPView, ModelAdapter, adapter_for
from lit_prune.criteria.width import WidthScores
from lit_prune.criteria.width_config import PARAMS_OF, ParamsOf, WidthConfig, check_amount, check_choice
from lit_prune.plan import PruningPlan, _as_index

log = logging.getLogger(__name__)

_EPS = 1e-9
"""Slack for ``ceil(fraction * n)`` so that e.g. ``ceil(0.3 * 10)`` is 3, not 4."""
GROUP_WARN_FRACTION = 1 / 3
"""``gqa="group"`` plans that remove at least this share of some block's KV groups are warned about."""


# --- per-block accounting ----------------------------------------------------------------------------------------
def _linear_numel(linear: nn.Linear) -> int:
    """Weight plus bias elements of a Linear, read from its shape (a PEFT-wrapped layer counts as its base)."""
    return (linear.in_features + (1 if linear.bias is not None else 0)) * linear.out_features


def _attention_params(view: AttentionView) -> int:
    """Parameters of a block's attention projections (weights and biases; a fused Linear once)."""
    return sum(_linear_numel(p.linear) for p in view.linears())


def _mlp_params(view: MLPView) -> int:
    """Parameters of a block's MLP projections (weights and biases; a fused Linear once)."""
    return sum(_linear_numel(p.linear) for p in view.linears())


@dataclass(frozen=True)
class _Block:
    """One block's current widths and the cost of each removable unit, read from the modules."""

    num_heads: int
    num_groups: int
    head_cost: int
    group_cost: int
    neurons: int
    neuron_cost: int

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.num_heads // self.num_groups


def _blocks(adapter: ModelAdapter, model: nn.Module) -> list[_Block]:
    """The :class:`_Block` of every block of ``model``."""
    out = []
    for attn, mlp in zip(adapter.attentions(model), adapter.mlps(model)):
        head, group, neuron = adapter.head_params(attn), adapter.kv_group_params(attn), adapter.neuron_params(mlp)
        out.append(_Block(attn.num_heads, attn.num_kv_heads, head, group, mlp.intermediate_size, neuron))
    return out


def _prunable_params(adapter: ModelAdapter, model: nn.Module) -> tuple[int, int]:
    """``(N_attn, N_mlp)``: attention and MLP projection parameters summed over the blocks."""
    n_attn = sum(_attention_params(v) for v in adapter.attentions(model))
    n_mlp = sum(_mlp_params(v) for v in adapter.mlps(model))
    return n_attn, n_mlp


# --- budget ------------------------------------------------------------------------------------------------------
def _round_half_up(x: float) -> int:
    """``x`` rounded to the nearest int, halves up (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)


def params_to_remove(model: nn.Module, amount: float | int, of: ParamsOf = WidthConfig.of) -> int:
    """The number of parameters ``amount`` asks to remove from ``model``.

    Args:
        model: the model to prune (only read).
        amount: a float in (0, 1), the fraction of ``of``; or an int >= 1, an absolute number of parameters.
        of: what a fractional ``amount`` is a fraction of: ``"total"`` (all parameters, tied weights once) or
            ``"non_embedding"`` (everything but the embedding and an untied LM head). Ignored for an int ``amount``.

    Returns:
        ``R``, at least 1 and below ``N_attn + N_mlp`` (the attention and MLP parameters width pruning can remove).

    Raises:
        ValueError: if ``of`` is unknown, ``amount`` is a bool, NaN, a float outside (0, 1), an int < 1, or asks for
            nothing or for at least every attention and MLP parameter.
    """
    check_choice("of", of, PARAMS_OF)
    check_amount(amount)
    as_int = _as_index(amount)
    adapter = adapter_for(model)
    prunable = sum(_prunable_params(adapter, model))
    if as_int is not None:
        removed = as_int
    else:
        fraction = float(amount)
        base = adapter.total_params(model) if of == "total" else adapter.non_embedding_params(model)
        removed = _round_half_up(fraction * base)
        if removed < 1:
            raise ValueError(f"`amount`={amount!r} of the {base:,} {of} parameters rounds to no parameter to remove")
    if removed >= prunable:
        raise ValueError(
            f"`amount`={amount!r} asks to remove {removed:,} parameters, but the attention and MLP projections hold "
            f"only {prunable:,}; width pruning can remove fewer than that"
        )
    return removed


def check_width_options(amount: object, **options: Any) -> None:
    """Validate every :func:`make_width_plan` option that does not depend on the model (builds a ``WidthConfig``).

    Raises:
        ValueError: naming the first bad option, the value received and what is allowed.
        TypeError: for a keyword that is not a :class:`~lit_prune.criteria.width_config.WidthConfig` field.
    """
    WidthConfig.build(amount=amount, **options)


def uniform_ratio(model: nn.Module, num_params: int) -> float:
    """AMP's per-block ratio ``p = R / (N_attn + N_mlp)`` for removing ``num_params`` parameters.

    Args:
        model: the model to prune (only read).
        num_params: ``R``, e.g. from :func:`params_to_remove`; an int >= 1.

    Returns:
        ``p`` in (0, 1).

    Raises:
        ValueError: if ``num_params`` is not an int >= 1 or is at least ``N_attn + N_mlp``.
    """
    check_int("num_params", num_params, minimum=1)
    prunable = sum(_prunable_params(adapter_for(model), model))
    if num_params >= prunable:
        raise ValueError(
            f"`num_params`={num_params:,} must be below the {prunable:,} attention and MLP parameters of the model"
        )
    return num_params / prunable


# --- units and their limits --------------------------------------------------------------------------------------
def _by_groups(block: _Block, gqa: str) -> bool:
    """Whether the block's attention units are KV groups (``gqa="group"``, or one head per group: MHA)."""
    return gqa == "group" or block.group_size == 1


def _at_least(fraction: float, n: int) -> int:
    """``ceil(fraction * n)``, and at least 1."""
    return max(1, math.ceil(fraction * n - _EPS))


def _head_units(block: _Block, gqa: str, min_keep: float) -> tuple[int, int, int]:
    """``(units, removable units, cost of a unit)`` of a block's attention.

    A unit is a KV group when :func:`_by_groups`, else "one query head from every group" (``group_size`` units).
    """
    if _by_groups(block, gqa):
        n = block.num_groups
        return n, n - _at_least(min_keep, n), block.group_cost
    n = block.group_size
    return n, n - _at_least(min_keep, n), block.num_groups * block.head_cost


def _min_neurons(block: _Block, min_keep: float, round_to: int) -> int:
    """The fewest neurons a block may keep: ``ceil(min_keep * I)`` rounded up to ``round_to``; ``I`` if above it."""
    minimum = math.ceil(_at_least(min_keep, block.neurons) / round_to) * round_to
    top = block.neurons // round_to * round_to
    return minimum if minimum <= top else block.neurons


def _snap(want: float, width: int, minimum: int, round_to: int) -> int:
    """The allowed kept width nearest ``want``: ``width`` itself or a multiple of ``round_to`` in [minimum, width].

    Ties go to the larger width, so the result never decreases as ``want`` grows.
    """
    top = width // round_to * round_to
    if minimum >= width or top < minimum:
        return width
    cand = min(max(_round_half_up(want / round_to) * round_to, minimum), top)
    return width if abs(width - want) <= abs(cand - want) else cand


def _next_lower(kept: int, minimum: int, round_to: int) -> int | None:
    """The next allowed kept width below ``kept``, or None at the minimum."""
    lower = (kept - 1) // round_to * round_to
    return lower if lower >= minimum and lower >= 1 else None


def _next_higher(kept: int, width: int, round_to: int) -> int | None:
    """The next allowed kept width above ``kept``, or None at the full width."""
    return None if kept >= width else min(kept + round_to, width)


# --- ordering ----------------------------------------------------------------------------------------------------
def _normalised(scores: Tensor) -> Tensor:
    """``scores`` divided by their mean absolute value (in float64), so blocks compare on one scale."""
    values = scores.double()
    scale = values.abs().mean()
    return values / scale if scale > 0 else values


def _ascending(scores: Tensor) -> Tensor:
    """Indices from least to most important (stable: on ties the lower index first)."""
    return torch.sort(_normalised(scores), stable=True).indices


def _global_counts(
    unit_scores: Sequence[Tensor], costs: Sequence[int], caps: Sequence[int], target: float
) -> list[int]:
    """How many of each block's lowest units to remove: units ranked across blocks, taken lowest first.

    Scores are normalised per block (:func:`_normalised`); a block gives at most ``caps[b]`` units; units are taken
    until the removed cost is nearest ``target``.
    """
    values, owner, rank = [], [], []
    for b, scores in enumerate(unit_scores):
        values.append(torch.sort(_normalised(scores), stable=True).values)
        owner.append(torch.full((scores.numel(),), b, dtype=torch.long))
        rank.append(torch.arange(scores.numel()))
    order = torch.sort(torch.cat(values), stable=True).indices  # within a block, rank order is kept
    who, pos = torch.cat(owner)[order], torch.cat(rank)[order]
    who = who[pos < torch.tensor(list(caps), dtype=torch.long)[who]]
    cum = torch.cumsum(torch.tensor(list(costs), dtype=torch.float64)[who], dim=0)
    take = int(torch.searchsorted(cum, torch.tensor([float(target)], dtype=torch.float64)).item())
    if take < len(cum):
        below = float(cum[take - 1]) if take > 0 else 0.0
        take += int(float(cum[take]) - target < target - below)  # the last unit only if it lands nearer
    return torch.bincount(who[:take], minlength=len(unit_scores)).tolist()


def _unit_scores(block_heads: Tensor, block: _Block, gqa: str) -> Tensor:
    """Scores of a block's attention units: group means, or the mean of every group's j-th lowest head."""
    grouped = block_heads.view(block.num_groups, block.group_size)  # (G, group_size)
    if _by_groups(block, gqa):
        return grouped.mean(dim=1)
    return torch.sort(grouped, dim=1, stable=True).values.mean(dim=0)


# --- allocations -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Limits:
    """Per-block limits shared by both allocations."""

    head_caps: list[int]
    unit_costs: list[int]
    neuron_mins: list[int]

    def mlp_max(self, blocks: Sequence[_Block]) -> int:
        """Most MLP parameters removable with every block at its minimum."""
        return sum((b.neurons - m) * b.neuron_cost for b, m in zip(blocks, self.neuron_mins))

    def attention_max(self) -> int:
        """Most attention parameters removable with every block at its minimum."""
        return sum(c * u for c, u in zip(self.head_caps, self.unit_costs))


def _mlp_removed(blocks: Sequence[_Block], kept: Sequence[int]) -> int:
    return sum((b.neurons - k) * b.neuron_cost for b, k in zip(blocks, kept))


def _uniform_units(blocks: Sequence[_Block], limits: _Limits, gqa: str, p: float) -> list[int]:
    """AMP heads: ``round(p * units)`` units per block.

    Raises:
        ValueError: if that count would leave a block with fewer heads than ``min_keep`` allows (with the default
            ``min_keep``: every head of a KV group, or every group). Nothing is capped silently.
    """
    counts = []
    for b, (block, cap) in enumerate(zip(blocks, limits.head_caps)):
        grouped = _by_groups(block, gqa)
        units = block.num_groups if grouped else block.group_size
        count = _round_half_up(p * units)
        if count > cap:
            what = (
                f"{count} of its {units} KV groups"
                if grouped
                else f"{count} of the {units} query heads of each KV group"
            )
            raise ValueError(
                f"The uniform ratio p={p:.3f} would remove {what} in block {b}, leaving fewer heads than `min_keep` "
                f"allows (at most {cap} may go); lower `amount`, use allocation='global', or lower `min_keep`"
            )
        counts.append(count)
    return counts


def _uniform_neurons(blocks: Sequence[_Block], limits: _Limits, round_to: int, target: float) -> list[int]:
    """One MLP ratio ``q`` for every block, the one whose snapped kept widths remove nearest ``target``.

    The removed count is a non-decreasing step function of ``q``; bisection finds the step around ``target``.
    """

    def kept_at(q: float) -> list[int]:
        return [_snap(b.neurons * (1 - q), b.neurons, m, round_to) for b, m in zip(blocks, limits.neuron_mins)]

    if target <= 0:
        return kept_at(0.0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _mlp_removed(blocks, kept_at(mid)) < target:
            lo = mid
        else:
            hi = mid
    below, above = kept_at(lo), kept_at(hi)
    return above if _mlp_removed(blocks, above) - target < target - _mlp_removed(blocks, below) else below


def _global_neurons(
    blocks: Sequence[_Block], neuron_scores: Sequence[Tensor], limits: _Limits, round_to: int, target: float
) -> list[int]:
    """Lowest normalised neurons across blocks, each block snapped to ``round_to``, then the total re-balanced.

    The re-balancing removes the lowest remaining ``round_to`` chunk (or restores the highest removed one) across
    blocks while that brings the total nearer ``target``.
    """
    caps = [b.neurons - m for b, m in zip(blocks, limits.neuron_mins)]
    counts = _global_counts(neuron_scores, [b.neuron_cost for b in blocks], caps, max(target, 0.0))
    kept = [_snap(b.neurons - c, b.neurons, m, round_to) for b, c, m in zip(blocks, counts, limits.neuron_mins)]
    prefix = [
        torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.sort(_normalised(s)).values, 0)])
        for s in neuron_scores
    ]

    def chunk_mean(b: int, hi: int, lo: int) -> float:  # neurons removed going from kept=hi to kept=lo
        start, stop = blocks[b].neurons - hi, blocks[b].neurons - lo
        return float(prefix[b][stop] - prefix[b][start]) / (stop - start)

    removed = _mlp_removed(blocks, kept)
    while removed != target:
        moves = []
        for b, (block, k) in enumerate(zip(blocks, kept)):
            other = (
                _next_lower(k, limits.neuron_mins[b], round_to)
                if removed < target
                else _next_higher(k, block.neurons, round_to)
            )
            if other is not None:
                moves.append((chunk_mean(b, max(k, other), min(k, other)), b, other))
        if not moves:
            break
        _, b, other = min(moves) if removed < target else max(moves)
        after = removed + (kept[b] - other) * blocks[b].neuron_cost
        if abs(after - target) >= abs(removed - target):
            break
        kept[b], removed = other, after
    return kept


# --- indices -----------------------------------------------------------------------------------------------------
def _kept_heads(block_heads: Tensor, block: _Block, gqa: str, units: int) -> tuple[int, ...]:
    """Query-head indices a block keeps after removing ``units`` of its lowest attention units."""
    gs = block.group_size
    grouped = block_heads.view(block.num_groups, gs)  # (G, group_size)
    if _by_groups(block, gqa):
        dropped_groups = set(_ascending(grouped.mean(dim=1))[:units].tolist())
        return tuple(h for h in range(block.num_heads) if h // gs not in dropped_groups)
    dropped = {g * gs + int(i) for g in range(block.num_groups) for i in _ascending(grouped[g])[:units]}
    return tuple(h for h in range(block.num_heads) if h not in dropped)


def _warn_many_groups(blocks: Sequence[_Block], units: Sequence[int]) -> None:
    """Warn once when a ``gqa="group"`` plan removes at least :data:`GROUP_WARN_FRACTION` of a GQA block's KV groups.

    MHA blocks (one head per group) are left out: there ``"query"`` mode removes the same units.
    """
    heavy = [
        (u / blk.num_groups, b, u, blk)
        for b, (blk, u) in enumerate(zip(blocks, units))
        if blk.group_size > 1 and u >= GROUP_WARN_FRACTION * blk.num_groups - _EPS
    ]
    if not heavy:
        return
    _, b, u, blk = max(heavy, key=lambda item: (item[0], -item[1]))
    rank_zero_warn(
        f"gqa='group' removes {u} of the {blk.num_groups} KV groups of block {b} ({u * blk.group_size} of its "
        f"{blk.num_heads} query heads with their k/v rows); {len(heavy)} of {len(blocks)} blocks lose at least "
        f"{GROUP_WARN_FRACTION:.0%} of their KV groups. With few KV groups this drops a large share of all attention "
        "(seen on Qwen2 with 2 KV groups: 2.3x the perplexity of gqa='query' at the same budget); consider "
        "gqa='query', which removes query heads inside every group and keeps k/v.",
        category=UserWarning,
    )


def _kept_neurons(block_neurons: Tensor, kept: int) -> tuple[int, ...]:
    """Neuron indices a block keeps: all but its ``I - kept`` lowest."""
    dropped = set(_ascending(block_neurons)[: block_neurons.numel() - kept].tolist())
    return tuple(j for j in range(block_neurons.numel()) if j not in dropped)


# --- validation --------------------------------------------------------------------------------------------------
def _check_scores(scores: object, blocks: Sequence[_Block]) -> WidthScores:
    """``scores`` if it is a :class:`WidthScores` matching the model's current widths; otherwise raise."""
    if not isinstance(scores, WidthScores):
        raise TypeError(f"`scores` must be a WidthScores, got {type(scores).__name__}")
    if scores.num_blocks != len(blocks):
        raise ValueError(f"`scores` must hold one entry per block ({len(blocks)}), got {scores.num_blocks}")
    for b, block in enumerate(blocks):
        for kind, values, width in (
            ("heads", scores.heads, block.num_heads),
            ("neurons", scores.neurons, block.neurons),
        ):
            if values[b].numel() != width:
                raise ValueError(
                    f"`scores.{kind}[{b}]` must hold {width} scores (block {b}'s current {kind}), "
                    f"got {values[b].numel()}"
                )
    return scores


# --- the plan ----------------------------------------------------------------------------------------------------
def make_width_plan(
    model: nn.Module,
    scores: WidthScores,
    amount: float | int | None = None,
    *,
    config: WidthConfig | None = None,
    method: str = "",
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> PruningPlan:
    """Choose the query heads and MLP neurons to remove so that about ``amount`` parameters go.

    The options are a :class:`~lit_prune.criteria.width_config.WidthConfig` (shared with
    :class:`~lit_prune.callbacks.WidthPruning` and :func:`~lit_prune.criteria.scoring.score_width`): pass one as
    ``config``, or its fields as keywords, which replace the config's (or the defaults'), e.g.
    ``make_width_plan(model, scores, 0.2, gqa="group", allocation="global", round_to=8)``.

    The model is only read, never modified. ``R`` = :func:`params_to_remove`; ``p = R / (N_attn + N_mlp)``. The
    lowest-scored heads and neurons go (ties: the lower index first). See the module docstring for the GQA modes and
    the two allocations; in both, every block keeps at least ``min_keep`` of its heads (and at least one head per
    group, or one group) and of its neurons (``ceil(min_keep * I)`` rounded up to ``round_to``), and kept MLP widths
    are multiples of ``round_to`` (a block that loses no neuron keeps its width). The removed total is within about
    one ``round_to`` step of neurons per block of ``R``, unless the head rounding alone already exceeds ``R``.

    Args:
        model: the model to prune, with its current widths (a model already pruned non-uniformly is fine).
        scores: one score per query head and per neuron of every block (higher = more important).
        amount: the config's ``amount``: a float in (0, 1), the fraction of ``of`` to remove; or an int >= 1, a
            number of parameters (None: keep the config's, by default 0.2).
        config: the options; None: the defaults.
        method: recorded in the plan; defaults to ``"width:<criterion>"``.
        meta: provenance recorded in the plan (copied); the allocation's own keys are added and take precedence.
        **options: any other ``WidthConfig`` field read here: ``of`` (``"total"``, tied weights once, or
            ``"non_embedding"``: what a fraction refers to), ``gqa`` (``"query"``: the same number of query heads
            from every KV group; ``"group"``: whole KV groups), ``allocation`` (``"uniform"``, the same ratio in
            every block as AMP, or ``"global"``, ranked across blocks), ``round_to`` (kept MLP widths are
            multiples of this, e.g. 8 or 64 for fast kernels), ``min_keep`` (the fraction of each block's heads
            and neurons that always stays, in (0, 1]).

    Returns:
        A plan with ``keep_heads`` / ``keep_neurons`` for the blocks that change, the widths before, and the
        parameter counts before and after (exactly what surgery leaves: a query head takes its q rows and o_proj
        columns, a KV group also its k/v rows, a neuron its gate/up rows and down_proj column).

    Raises:
        ValueError: if an option is not one of its allowed values, ``round_to`` is not an int >= 1, ``min_keep`` is
            not in (0, 1], ``amount`` is invalid (see :func:`params_to_remove`), ``scores`` do not match the model's
            blocks and widths, or the minimum widths leave fewer than ``R`` parameters removable (the message says
            how many can be).
        TypeError: if ``scores`` is not a :class:`WidthScores`, ``meta`` is not a dict, or a keyword is not a
            ``WidthConfig`` field.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg)
        >>> scores = WidthScores(heads=(torch.tensor([4.0, 1.0, 2.0, 3.0]),) * 2,
        ...                      neurons=(torch.arange(32.0),) * 2, criterion="amp")
        >>> plan = make_width_plan(model, scores, amount=0.3, round_to=4)
        >>> plan.keep_heads
        {0: (0, 3), 1: (0, 3)}
        >>> plan.meta["kept_neurons"], plan.keep_neurons[0][:3], plan.method
        ([20, 20], (12, 13, 14), 'width:amp')
    """
    cfg = WidthConfig.build(config, **({"amount": amount} if amount is not None else {}), **options)
    amount, of, gqa = cfg.amount, cfg.of, cfg.gqa
    allocation, round_to, min_keep = cfg.allocation, cfg.round_to, cfg.min_keep
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"`meta` must be a dict or None, got {type(meta).__name__}")
    adapter = adapter_for(model)
    blocks = _blocks(adapter, model)
    _check_scores(scores, blocks)
    target = params_to_remove(model, amount, of)
    p = uniform_ratio(model, target)

    head_units = [_head_units(b, gqa, min_keep) for b in blocks]
    limits = _Limits(
        head_caps=[cap for _, cap, _ in head_units],
        unit_costs=[cost for _, _, cost in head_units],
        neuron_mins=[_min_neurons(b, min_keep, round_to) for b in blocks],
    )
    most = limits.attention_max() + limits.mlp_max(blocks)
    total = adapter.total_params(model)
    if target > most:
        raise ValueError(
            f"`amount`={amount!r} asks to remove {target:,} parameters, but at most {most:,} "
            f"({most / total:.1%} of all {total:,}) can be removed with gqa={gqa!r}, min_keep={min_keep}, "
            f"round_to={round_to} (every block keeps at least one head per group or one group, and its minimum widths)"
        )

    if allocation == "uniform":
        units = _uniform_units(blocks, limits, gqa, p)
    else:
        unit_scores = [_unit_scores(h, b, gqa) for h, b in zip(scores.heads, blocks)]
        n_attn, _ = _prunable_params(adapter, model)
        units = _global_counts(unit_scores, limits.unit_costs, limits.head_caps, p * n_attn)
    attn_removed = sum(u * c for u, c in zip(units, limits.unit_costs))
    if gqa == "group":
        _warn_many_groups(blocks, units)
    mlp_target = target - attn_removed
    if mlp_target > limits.mlp_max(blocks):
        raise ValueError(
            f"`amount`={amount!r} asks to remove {target:,} parameters; allocation={allocation!r} at ratio p={p:.4f} "
            f"removes {attn_removed:,} from attention and at most {limits.mlp_max(blocks):,} from the MLPs "
            f"(min_keep={min_keep}, round_to={round_to}), so at most {attn_removed + limits.mlp_max(blocks):,}; "
            "lower `amount` or `min_keep`"
        )
    if allocation == "uniform":
        kept_neurons = _uniform_neurons(blocks, limits, round_to, mlp_target)
    else:
        kept_neurons = _global_neurons(blocks, scores.neurons, limits, round_to, mlp_target)
    removed = attn_removed + _mlp_removed(blocks, kept_neurons)
    if removed == 0:
        cheapest = min(min(b.neuron_cost * round_to for b in blocks), min(limits.unit_costs))
        raise ValueError(
            f"`amount`={amount!r} ({target:,} parameters) is below the smallest unit that can go ({cheapest:,} "
            f"parameters with round_to={round_to}), so nothing would be removed; give a larger count, or a float "
            "in (0, 1) for a fraction"
        )

    keep_heads = {b: _kept_heads(scores.heads[b], blk, gqa, u) for b, (blk, u) in enumerate(zip(blocks, units)) if u}
    keep_neurons = {
        b: _kept_neurons(scores.neurons[b], k)
        for b, (blk, k) in enumerate(zip(blocks, kept_neurons))
        if k < blk.neurons
    }
    kept_head_counts = [len(keep_heads.get(b, range(blk.num_heads))) for b, blk in enumerate(blocks)]
    plan_meta = dict(meta or {})
    plan_meta.update(
        criterion=scores.criterion,
        amount=int(amount) if _as_index(amount) is not None else float(amount),
        of=of,
        gqa=gqa,
        allocation=allocation,
        round_to=round_to,
        min_keep=float(min_keep),
        target_params_removed=target,
        params_removed=removed,
        ratio=p,
        kept_heads=kept_head_counts,
        kept_neurons=list(kept_neurons),
        head_scores=[[round(float(v), 6) for v in block_heads] for block_heads in scores.heads],
    )
    non_embedding = adapter.non_embedding_params(model)
    plan = PruningPlan(
        num_layers=len(blocks),
        method=method or f"width:{scores.criterion}",
        params_before=total,
        params_after=total - removed,
        non_embedding_before=non_embedding,
        non_embedding_after=non_embedding - removed,
        keep_heads=keep_heads,
        keep_neurons=keep_neurons,
        heads_before=tuple(b.num_heads for b in blocks),
        neurons_before=tuple(b.neurons for b in blocks),
        meta=plan_meta,
    )
    log.debug(
        "Width plan (%s, %s, gqa=%s): remove %s parameters (target %s, p=%.4f); heads %s -> %s, neurons %s -> %s",
        plan.method,
        allocation,
        gqa,
        f"{removed:,}",
        f"{target:,}",
        p,
        sum(b.num_heads for b in blocks),
        sum(kept_head_counts),
        sum(b.neurons for b in blocks),
        sum(kept_neurons),
    )
    return plan
