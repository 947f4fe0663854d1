"""``WidthConfig``: every option of width pruning (heads and neurons: criterion, budget, GQA mode, allocation).

:class:`~lit_prune.callbacks.WidthPruning` (whose flat keyword arguments, the YAML names, default to these fields),
:func:`~lit_prune.criteria.scoring.score_width` and :func:`~lit_prune.allocation.make_width_plan` (which take a config
as ``config=``, or its fields as keywords) read their options from here, and MoP's width candidate takes its GQA
mode and rounding defaults from it, so a default or a rule lives here only. It sits next to the criteria because
:mod:`lit_prune.criteria.width` reads it (it only needs the registry).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from numbers import Real
from typing import Literal

from lit_prune._config import MethodConfig, check_seed
from lit_prune._validation import check_choice, check_int
from lit_prune.criteria import registry
from lit_prune.plan import _as_index

WidthCriterion = Literal["amp", "amp_act", "magnitude", "wanda_sp", "random", "reversed"]
"""The registered width criteria (``registry.names("width")``; a test keeps the two equal)."""
GQAMode = Literal["query", "group"]
"""``query``: the same number of query heads from every KV group; ``group``: whole KV groups with their k/v rows."""
WidthAllocation = Literal["uniform", "global"]
"""``uniform`` (AMP: one ratio in every block) or ``global`` (scores normalised per block, ranked across blocks)."""
ParamsOf = Literal["total", "non_embedding"]
"""What a fractional ``amount`` is a fraction of."""

GQA_MODES: tuple[str, ...] = typing.get_args(GQAMode)
WIDTH_ALLOCATIONS: tuple[str, ...] = typing.get_args(WidthAllocation)
PARAMS_OF: tuple[str, ...] = typing.get_args(ParamsOf)


def check_amount(amount: object) -> None:
    """Raise unless ``amount`` is a float in (0, 1) or an int >= 1 (numpy scalars accepted, bools and NaN not).

    Raises:
        ValueError: naming ``amount``, what is allowed and the value received.
    """
    as_int = _as_index(amount)
    message = f"`amount` must be a float in (0, 1) or an int >= 1, got {amount!r}"
    if isinstance(amount, bool) or (as_int is None and not isinstance(amount, Real)):
        raise ValueError(message)
    if as_int is not None and as_int < 1:
        raise ValueError(message)
    if as_int is None and not 0.0 < float(amount) < 1.0:  # type: ignore[arg-type]  # also rejects NaN
        raise ValueError(message)


def check_min_keep(min_keep: object) -> None:
    """Raise unless ``min_keep`` is a number in (0, 1].

    Raises:
        ValueError: naming ``min_keep`` and the value received.
    """
    if isinstance(min_keep, bool) or not isinstance(min_keep, Real) or not 0.0 < float(min_keep) <= 1.0:
        raise ValueError(f"`min_keep` must be a number in (0, 1], got {min_keep!r}")


@dataclass(frozen=True)
class WidthConfig(MethodConfig):
    """What width pruning removes: the criterion, the budget and how it is spread over heads, groups and neurons.

    Every field is checked on construction (:meth:`__post_init__`).

    Example:
        >>> WidthConfig(amount=0.3, gqa="group", round_to=8).allocation
        'uniform'
        >>> WidthConfig(gqa="kv")
        Traceback (most recent call last):
        ...
        ValueError: `gqa` must be one of ['query', 'group'], got 'kv'
    """

    criterion: WidthCriterion = "amp"
    """``amp`` (mean L1 norm of each head's and neuron's contribution to the block output), ``amp_act`` (the AMP
    paper code: neurons by mean |activation| only), ``magnitude`` (weight norms), ``wanda_sp`` (|W|·‖x‖ summed over
    the unit's weights), and the controls ``random`` (seeded) and ``reversed`` (of ``reversed_of``)."""
    amount: float | int = 0.2
    """A fraction in (0, 1) of the parameters counted by ``of``, or an int: parameters to remove."""
    of: ParamsOf = "total"
    """``total`` (all parameters, tied weights once) or ``non_embedding``: what a fractional ``amount`` refers to."""
    gqa: GQAMode = "query"
    """``query`` removes the same number of query heads from every KV group (k/v kept; a uniform result stays a
    stock checkpoint); ``group`` removes whole KV groups (their query heads and k/v rows)."""
    allocation: WidthAllocation = "uniform"
    """``uniform`` (AMP: the same ratio in every block) or ``global`` (scores normalised per block and ranked across
    blocks; every block keeps at least ``min_keep``)."""
    round_to: int = 1
    """Kept MLP widths are multiples of this (e.g. 8 or 64, for hardware-friendly matmuls)."""
    min_keep: float = 0.1
    """The smallest fraction of heads and neurons any block keeps, in (0, 1] (a uniform ratio that would go below
    it is an error, global allocation stops at it)."""
    reversed_of: str = "amp"
    """The criterion that ``reversed`` negates (any but ``reversed``)."""
    seed: int = 0
    """The seed of ``random``."""

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the field, its value and what is allowed.
        """
        registry.criterion("width", self.criterion)
        registry.members("width", "reversed", {"reversed": self.reversed_of})  # what `reversed` may negate
        check_amount(self.amount)
        check_choice("gqa", self.gqa, GQA_MODES)
        check_choice("allocation", self.allocation, WIDTH_ALLOCATIONS)
        check_choice("of", self.of, PARAMS_OF)
        check_int("round_to", self.round_to, minimum=1)
        check_min_keep(self.min_keep)
        check_seed(self.seed)
