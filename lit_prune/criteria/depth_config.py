"""``DepthConfig``: every option of depth pruning (which blocks go, by which criterion), its default and its check.

:class:`~lit_prune.callbacks.DepthPruning` (whose flat keyword arguments, the YAML names, default to these fields),
:func:`~lit_prune.criteria.scoring.score_blocks` and :func:`~lit_prune.allocation.make_depth_plan` (which take a config
as ``config=``, or its fields as keywords) read their options from here, so a default or a rule lives here only.
It sits next to the criteria because :mod:`lit_prune.criteria.depth` reads it (it only needs the registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lit_prune._config import MethodConfig, check_seed
from lit_prune.criteria import registry

DepthCriterion = Literal[
    "bi",
    "angular",
    "angular_block",
    "cka",
    "cka_all",
    "cka_global",
    "cosine_global",
    "kl_global",
    "consensus",
    "random",
    "reversed",
]
"""The registered depth criteria (``registry.names("depth")``; a test keeps the two equal)."""

ONE_PASS = ("bi", "angular", "cka")
"""Criteria computed from one statistics pass; the default members of ``consensus``."""


@dataclass(frozen=True)
class DepthConfig(MethodConfig):
    """What depth pruning removes and how it ranks the blocks.

    Every field is checked on construction (:meth:`__post_init__`); ``protect`` is stored sorted and without
    repeats, ``consensus_of`` as a tuple. ``num_layers`` and ``amount`` may both be None for scoring alone
    (:func:`~lit_prune.criteria.scoring.score_blocks`); :class:`~lit_prune.callbacks.DepthPruning` needs one.

    Example:
        >>> cfg = DepthConfig(criterion="consensus", amount=0.2, protect=[29, 0, 0])
        >>> cfg.protect, cfg.consensus_of, cfg.num_to_remove(30)
        ((0, 29), ('bi', 'angular', 'cka'), 6)
        >>> DepthConfig(num_layers=0)
        Traceback (most recent call last):
        ...
        ValueError: `num_layers` must be an int >= 1, got 0
    """

    criterion: DepthCriterion = "bi"
    """``bi`` (Block Influence), ``angular`` (last token), ``angular_block`` (the contiguous window of the removed
    count), ``cka`` / ``cka_all`` (1 − linear CKA of block input and output, last / all tokens), ``cka_global`` /
    ``cosine_global`` / ``kl_global`` (the final representation / next-token distribution with and without each
    block), ``consensus`` (Borda count over ``consensus_of``), and the controls ``random`` (seeded) and
    ``reversed`` (of ``reversed_of``)."""
    num_layers: int | None = None
    """How many blocks to remove (or give ``amount``)."""
    amount: float | None = None
    """Or the fraction of the current blocks to remove, in (0, 1) (rounded to the nearest block, at least one)."""
    protect: tuple[int, ...] = ()
    """Block indices that are never removed (e.g. ``(0, 29)`` for the first and last)."""
    consensus_of: tuple[str, ...] = ONE_PASS
    """The criteria ``consensus`` aggregates (default the one-pass ones: bi, angular, cka)."""
    reversed_of: str = "bi"
    """The criterion that ``reversed`` negates."""
    seed: int = 0
    """The seed of ``random``."""

    def __post_init__(self) -> None:
        """Check every field; store ``protect`` sorted and unique and ``consensus_of`` as a tuple.

        Raises:
            ValueError: naming the field, its value and what is allowed.
        """
        registry.criterion("depth", self.criterion)
        consensus_of = self.consensus_of
        listed = tuple(consensus_of) if not isinstance(consensus_of, str) else consensus_of
        registry.members("depth", "consensus", {"consensus": listed})
        registry.members("depth", "reversed", {"reversed": self.reversed_of})
        object.__setattr__(self, "consensus_of", listed)
        if self.num_layers is not None and self.amount is not None:
            self.check_count()
        num_layers = self.num_layers
        bad_count = isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
        if num_layers is not None and bad_count:
            raise ValueError(f"`num_layers` must be an int >= 1, got {num_layers!r}")
        amount = self.amount
        ok_amount = not isinstance(amount, bool) and isinstance(amount, int | float) and 0.0 < amount < 1.0
        if amount is not None and not ok_amount:
            raise ValueError(f"`amount` must be a fraction of the blocks in (0, 1), got {amount!r}")
        protect = list(self.protect) if not isinstance(self.protect, str) else [self.protect]
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in protect):
            raise ValueError(f"`protect` must hold block indices >= 0, got {protect!r}")
        object.__setattr__(self, "protect", tuple(sorted(set(protect))))
        check_seed(self.seed)

    def count_error(self) -> str | None:
        """Why the config cannot say how many blocks to remove (not exactly one of ``num_layers`` and ``amount``)."""
        if (self.num_layers is None) == (self.amount is None):
            given = f"num_layers={self.num_layers!r}, amount={self.amount!r}"
            return f"Give exactly one of `num_layers` and `amount`, got {given}"
        return None

    def check_count(self) -> None:
        """Raise unless exactly one of ``num_layers`` and ``amount`` is given (what removing blocks needs).

        Raises:
            ValueError: naming both values.
        """
        message = self.count_error()
        if message is not None:
            raise ValueError(message)

    def num_to_remove(self, num_blocks: int) -> int:
        """Blocks to remove from a model with ``num_blocks`` blocks: ``num_layers``, or ``amount`` × blocks.

        Raises:
            ValueError: if neither ``num_layers`` nor ``amount`` is given.
        """
        self.check_count()
        if self.num_layers is not None:
            return self.num_layers
        return max(1, round(float(self.amount or 0.0) * num_blocks))

    @property
    def has_count(self) -> bool:
        """Whether ``num_layers`` or ``amount`` says how many blocks to remove."""
        return self.num_layers is not None or self.amount is not None

    @property
    def members(self) -> dict[str, str | tuple[str, ...]]:
        """The members of the composites, as :mod:`~lit_prune.criteria.registry` takes them."""
        return {"consensus": self.consensus_of, "reversed": self.reversed_of}
