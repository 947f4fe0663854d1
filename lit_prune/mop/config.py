"""``MoPConfig``: every option of a Mixture-of-Pruners search, its default and its check, written once.

Both :class:`~lit_prune.mop.MoPSearch` (which takes a config as ``config=``, or its fields as keywords) and the
:class:`~lit_prune.callbacks.MixtureOfPruners` callback (whose flat keyword arguments, the YAML names, default to
these fields) build one. The width candidate's GQA mode, rounding and criterion default to those of
:class:`~lit_prune.criteria.width_config.WidthConfig`, the depth criterion to that of
:class:`~lit_prune.criteria.depth_config.DepthConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lit_prune._config import MethodConfig, check_seed
from lit_prune._validation import check_int
from lit_prune.criteria import registry
from lit_prune.criteria.depth_config import DepthConfig
from lit_prune.criteria.width_config import GQA_MODES, GQAMode, WidthConfig, WidthCriterion, check_choice
from lit_prune.mop.proxy import PROXIES

DEPTH, WIDTH = "L", "G"
"""Branch letters of a decision string: ``L`` removes a layer (depth), ``G`` heads and neurons (width)."""

MOP_DEPTH_CRITERIA = (*registry.names("depth", global_pass=False), "position")
"""Depth criteria MoP scores from the statistics it collects anyway (the registered depth criteria that need no
per-candidate pass, plus the paper code's ``position``)."""

Proxy = Literal["ppl", "kl", "cosine", "random"]
"""The named proxies (:data:`~lit_prune.mop.proxy.PROXIES`; a test keeps the two equal)."""

DEFAULT_PROXY: Proxy = "ppl"
"""The proxy a search uses unless told otherwise."""

ProxyFn = Callable[[str, nn.Module], float]
"""A custom proxy: ``proxy(branch, masked_model) -> loss`` (lower wins), called inside the candidate's context.
Run the model with ``use_cache=False`` there: with a block skipped, ``layer_idx`` values are stale."""


@dataclass(frozen=True)
class MoPConfig(MethodConfig):
    """What a MoP search removes, how it compares the candidates and how each candidate is built.

    Every field is checked on construction (:meth:`__post_init__`); ``target`` is stored as a float.

    Example:
        >>> MoPConfig(target=0.3, decisions="LGG").branches
        'LG'
        >>> MoPConfig(branches="X")
        Traceback (most recent call last):
        ...
        ValueError: `branches` must be 'LG', 'L' or 'G', got 'X'
    """

    target: float = 0.25
    """Fraction of ALL parameters (embeddings included) to remove, in (0, 1), counted from the model as it is when
    the search starts."""
    proxy: Proxy | ProxyFn = DEFAULT_PROXY
    """``ppl``, ``kl`` (to the dense model), ``cosine`` (final hidden states), ``random`` (seeded), or a callable
    ``proxy(branch, model) -> loss`` (:data:`ProxyFn`; not from YAML)."""
    depth_criterion: str = DepthConfig.criterion
    """How the depth candidate's block is chosen: one of :data:`MOP_DEPTH_CRITERIA` (the one-pass depth criteria,
    or ``position``: the third-to-last block, as the paper's code does)."""
    width_criterion: WidthCriterion = WidthConfig.criterion
    """How the width candidate's heads and neurons are chosen: any registered width criterion (``reversed``
    negates ``amp``)."""
    gqa: GQAMode = WidthConfig.gqa
    """GQA mode of the width candidate (``query`` or ``group``)."""
    round_to: int = WidthConfig.round_to
    """MLP widths of the width candidate stay multiples of this."""
    decisions: str | None = None
    """A decision string to replay (``L`` depth, ``G`` width per step) instead of searching."""
    branches: str = DEPTH + WIDTH
    """The branches to consider: ``"LG"`` (MoP); ``"L"`` or ``"G"`` give the single-branch baselines (depth only /
    width only, iterative) without measuring any proxy."""
    seed: int = 0
    """Seed of the ``random`` proxy (and of the ``random`` depth and width criteria, with the step)."""

    def __post_init__(self) -> None:
        """Check every field; store ``target`` as a float.

        Raises:
            ValueError: naming the field, its value and what is allowed.
        """
        proxy = self.proxy
        if not callable(proxy) and proxy not in PROXIES:
            raise ValueError(f"`proxy` must be one of {list(PROXIES)} or a callable, got {proxy!r}")
        check_choice("depth_criterion", self.depth_criterion, MOP_DEPTH_CRITERIA)
        registry.criterion("width", self.width_criterion, "width_criterion")
        check_choice("gqa", self.gqa, GQA_MODES)
        target = self.target
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0.0 < float(target) < 1.0:
            raise ValueError(f"`target` must be a fraction of all parameters in (0, 1), got {target!r}")
        object.__setattr__(self, "target", float(target))
        branches = self.branches
        if not isinstance(branches, str) or not branches or set(branches) - {DEPTH, WIDTH}:
            raise ValueError(f"`branches` must be 'LG', 'L' or 'G', got {branches!r}")
        decisions = self.decisions
        if decisions is not None and (not isinstance(decisions, str) or set(decisions) - {DEPTH, WIDTH}):
            raise ValueError(
                f"`decisions` must be a string of {DEPTH!r} (depth) and {WIDTH!r} (width), got {decisions!r}"
            )
        check_int("round_to", self.round_to, minimum=1)
        check_seed(self.seed)
