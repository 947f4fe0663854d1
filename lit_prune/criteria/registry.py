"""The criterion registry: every importance criterion, registered once with its name, kind and what it needs.

An entry (:class:`Criterion`) holds the criterion's pure scoring function, the statistics it needs (names the
collectors understand: :class:`~lit_prune.stats.DepthStatistics` needs such as ``"bi"``, the metrics of
:func:`~lit_prune.stats.collect_global_statistics` for a criterion that needs the per-candidate pass,
:class:`~lit_prune.stats.WidthStatistics` needs such as ``"amp_heads"``, ``LinearStats`` needs such as
``"input_sq"``), whether it needs that per-candidate (global) pass, and a one-line description. The modules that
define the criteria register them (:mod:`lit_prune.criteria.depth`, ``.width``, ``.sparse``); the name tuples
(``DEPTH_CRITERIA``, ...), the callbacks' validation and messages, MoP and ``prune_sparse`` read them from here.

Composite criteria (``consensus``, ``reversed``) are computed from other criteria's scores: they are registered
with their default members (``of``), and the caller may name others (``consensus_of=...``, ``reversed_of=...``).

Example:
    >>> from lit_prune.criteria import registry
    >>> registry.names("width")
    ('amp', 'amp_act', 'magnitude', 'wanda_sp', 'random', 'reversed')
    >>> sorted(registry.criterion("depth", "consensus").needs)
    ['angular', 'bi', 'cka_last']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

Kind = Literal["depth", "width", "sparse"]
KINDS: tuple[Kind, ...] = ("depth", "width", "sparse")
"""The criterion families: one score per block, per head / neuron, per weight."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ScoreInputs:
    """What a criterion's uniform scorer (:attr:`Criterion.call`) may read; each reads only what it needs.

    Args:
        stats: the reduced one-pass statistics (:class:`~lit_prune.stats.DepthStats` or
            :class:`~lit_prune.stats.WidthStats`), None when nothing was collected.
        global_stats: the per-candidate sums (:class:`~lit_prune.stats.GlobalStats`), None when not collected.
        model: the model the statistics were collected on (width criteria read its weights).
        num_blocks: ``L`` (the depth ``random`` control).
        n: the window length of ``angular_block``.
        seed: the seed of the ``random`` controls.
        scores: scores already computed, by criterion name (what a composite combines).
        of: a composite's members.
    """

    stats: Any = None
    global_stats: Any = None
    model: Any = None  # nn.Module | None
    num_blocks: int = 0
    n: int = 1
    seed: int = 0
    scores: Mapping[str, Any] = field(default_factory=dict)
    of: tuple[str, ...] = ()


@dataclass(frozen=True)
class Criterion:
    """One registered criterion.

    Args:
        name: what users write (``criterion="bi"``).
        kind: ``"depth"``, ``"width"`` or ``"sparse"``.
        fn: the pure scoring function (e.g. :func:`~lit_prune.criteria.bi`).
        needs: the statistics it reads, as the collector of its pass names them (empty: no data, e.g.
            ``magnitude``); for a composite, those of its default members.
        global_pass: whether it runs the model once per candidate block (``*_global``); its ``needs`` are then
            metrics of :func:`~lit_prune.stats.collect_global_statistics`.
        description: one line for messages and docs.
        call: ``fn`` on :class:`ScoreInputs` (how :func:`compute` calls it); None for the sparse criteria, which
            ``prune_sparse`` calls per Linear.
        of: a composite's default members (empty: not a composite).
        many: a composite over a list of members (``consensus``) rather than one (``reversed``).
        of_composites: whether a composite's members may be composites themselves (never itself).
    """

    name: str
    kind: Kind
    fn: Callable[..., Any]
    needs: frozenset[str]
    global_pass: bool
    description: str
    call: Callable[[ScoreInputs], Any] | None = field(default=None, repr=False)
    of: tuple[str, ...] = ()
    many: bool = False
    of_composites: bool = False

    @property
    def composite(self) -> bool:
        """Whether the criterion combines other criteria's scores (``consensus``, ``reversed``)."""
        return bool(self.of)

    @property
    def data_free(self) -> bool:
        """Whether it reads no calibration data (``magnitude``, ``random``) at its default members."""
        return not self.needs and not self.global_pass

    def score(self, inputs: ScoreInputs) -> Any:
        """``fn`` applied to ``inputs`` (see :attr:`call`).

        Raises:
            TypeError: if the criterion has no uniform scorer (the sparse criteria).
        """
        if self.call is None:
            raise TypeError(f"The {self.kind} criterion {self.name!r} has no uniform scorer; call its `fn`")
        return self.call(inputs)


_REGISTRY: dict[tuple[str, str], Criterion] = {}
"""``(kind, name) -> entry``, in registration order."""


def _check_kind(kind: object) -> None:
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {list(KINDS)}, got {kind!r}")


def register_criterion(
    name: str,
    kind: Kind,
    fn: F | None = None,
    *,
    description: str,
    needs: Iterable[str] = (),
    global_pass: bool | None = None,
    call: Callable[[ScoreInputs], Any] | None = None,
    of: Sequence[str] = (),
    many: bool = False,
    of_composites: bool = False,
) -> Any:
    """Register a criterion; use as a call (``register_criterion("bi", "depth", bi, ...)``) or a decorator.

    A composite's ``needs`` and ``global_pass`` default to those of its members ``of`` (registered before it).

    Args:
        name: the criterion's name, unique within ``kind``.
        kind: ``"depth"``, ``"width"`` or ``"sparse"``.
        fn: the scoring function; omitted, a decorator is returned.
        description: one line saying what it scores.
        needs: the statistics it reads (see :class:`Criterion`).
        global_pass: whether it needs the per-candidate pass (default False; a composite: any member's).
        call: ``fn`` on :class:`ScoreInputs`.
        of: a composite's default members.
        many: a composite over a list of members.
        of_composites: a composite whose members may be composites.

    Returns:
        ``fn`` (or a decorator that registers and returns its function).

    Raises:
        ValueError: for an unknown kind, an empty name or description, a name already registered for ``kind``, or
            a composite member that is not registered.

    Example:
        >>> register_criterion("bi", "depth", lambda stats: stats, description="again")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: A depth criterion named 'bi' is already registered (Block Influence: ...); choose another name
    """

    def register(function: F) -> F:
        _check_kind(kind)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"`name` must be a non-empty identifier, got {name!r}")
        if not isinstance(description, str) or not description.strip():
            raise ValueError(f"`description` of criterion {name!r} must be a non-empty line, got {description!r}")
        existing = _REGISTRY.get((kind, name))
        if existing is not None:
            raise ValueError(
                f"A {kind} criterion named {name!r} is already registered ({existing.description}); choose another name"
            )
        members = tuple(of)
        needed = set(needs)
        uses_global = bool(global_pass)
        for member in members:
            entry = _REGISTRY.get((kind, member))
            if entry is None:
                raise ValueError(f"Composite {kind} criterion {name!r}: member {member!r} is not registered")
            if not needs:
                needed |= entry.needs
            if global_pass is None:
                uses_global |= entry.global_pass
        _REGISTRY[(kind, name)] = Criterion(
            name=name,
            kind=kind,
            fn=function,
            needs=frozenset(needed),
            global_pass=uses_global,
            description=description,
            call=call,
            of=members,
            many=many,
            of_composites=of_composites,
        )
        return function

    return register if fn is None else register(fn)


def names(kind: Kind, *, composite: bool | None = None, global_pass: bool | None = None) -> tuple[str, ...]:
    """The registered names of ``kind``, in registration order, optionally filtered.

    Args:
        kind: ``"depth"``, ``"width"`` or ``"sparse"``.
        composite: keep only composites (True) or only the others (False).
        global_pass: keep only criteria that need (True) or do not need (False) the per-candidate pass.

    Raises:
        ValueError: for an unknown kind.
    """
    _check_kind(kind)
    return tuple(
        entry.name
        for (k, _), entry in _REGISTRY.items()
        if k == kind
        and (composite is None or entry.composite == composite)
        and (global_pass is None or entry.global_pass == global_pass)
    )


def _unknown(argument: str, value: object, allowed: Sequence[str]) -> ValueError:
    """The error for a name not in ``allowed``: the argument, the allowed names, the value, and the closest name."""
    close = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.75) if isinstance(value, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"`{argument}` must be one of {list(allowed)}, got {value!r}{hint}")


def check_name(value: object, allowed: Sequence[str], argument: str = "criterion") -> str:
    """Return ``value`` if it is one of ``allowed``, else raise naming ``argument``, the allowed names and the value.

    Raises:
        ValueError: ``"`criterion` must be one of [...], got 'x'"`` (with the closest name when one is close).
    """
    if not isinstance(value, str) or value not in allowed:
        raise _unknown(argument, value, allowed)
    return value


def criterion(kind: Kind, name: object, argument: str = "criterion") -> Criterion:
    """The entry of ``name`` among the ``kind`` criteria.

    Args:
        kind: ``"depth"``, ``"width"`` or ``"sparse"``.
        name: the criterion's name.
        argument: the argument the name came from, for the message.

    Raises:
        ValueError: if ``kind`` is unknown or no ``kind`` criterion is called ``name`` (the message names the
            argument, the allowed names and the value).

    Example:
        >>> criterion("width", "ampp")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `criterion` must be one of ['amp', 'amp_act', ...], got 'ampp'; did you mean 'amp'?
    """
    _check_kind(kind)
    entry = _REGISTRY.get((kind, name)) if isinstance(name, str) else None
    if entry is None:
        raise _unknown(argument, name, names(kind))
    return entry


def members(kind: Kind, name: str, of: Mapping[str, str | Sequence[str]] | None = None) -> tuple[str, ...]:
    """The direct members of composite ``name`` (``of[name]`` if given, else its defaults), validated.

    Raises:
        ValueError: if ``name`` is not a composite, or a member is not allowed (named in ``<name>_of``).
    """
    entry = criterion(kind, name)
    if not entry.composite:
        raise ValueError(f"The {kind} criterion {name!r} is not a composite (it has no members)")
    argument = f"{name}_of"
    given = (of or {}).get(name, entry.of if entry.many else entry.of[0])
    allowed = [n for n in names(kind) if n != name and (entry.of_composites or not criterion(kind, n).composite)]
    if not entry.many:
        return (check_name(given, allowed, argument),)
    listed = [] if isinstance(given, str) or not isinstance(given, Iterable) else list(given)
    if not listed:
        raise ValueError(f"`{argument}` must be a non-empty list of {allowed}, got {given!r}")
    return tuple(dict.fromkeys(check_name(m, allowed, argument) for m in listed))


def components(kind: Kind, name: object, of: Mapping[str, str | Sequence[str]] | None = None) -> list[str]:
    """The non-composite criteria that ``name`` is computed from, in order (``[name]`` for a single criterion).

    Args:
        kind: ``"depth"``, ``"width"`` or ``"sparse"``.
        name: a registered criterion.
        of: members of the composites involved, by composite name (``{"consensus": [...], "reversed": "bi"}``);
            a composite not in it uses its default members.

    Raises:
        ValueError: for an unknown name or a member that is not allowed.
    """
    entry = criterion(kind, name)
    if not entry.composite:
        return [entry.name]
    found: list[str] = []
    for member in members(kind, entry.name, of):
        found += [c for c in components(kind, member, of) if c not in found]
    return found


def needs(
    kind: Kind,
    criteria: str | Iterable[str],
    of: Mapping[str, str | Sequence[str]] | None = None,
    *,
    global_pass: bool = False,
) -> set[str]:
    """The statistics that the components of ``criteria`` read.

    Args:
        kind: ``"depth"``, ``"width"`` or ``"sparse"``.
        criteria: one name or several.
        of: members of the composites involved (see :func:`components`).
        global_pass: False: the needs of the statistics pass; True: the metrics of the per-candidate pass.

    Raises:
        ValueError: for an unknown name or a member that is not allowed.
    """
    if isinstance(criteria, str):
        criteria = (criteria,)
    needed: set[str] = set()
    for name in criteria:
        for component in components(kind, name, of):
            entry = criterion(kind, component)
            if entry.global_pass == global_pass:
                needed |= entry.needs
    return needed


def _pass_order(entry: Criterion) -> int:
    """0: reads the one statistics pass, 1: the per-candidate pass, 2: no data."""
    return 2 if entry.data_free else int(entry.global_pass)


def compute(
    kind: Kind, name: str, inputs: ScoreInputs, of: Mapping[str, str | Sequence[str]] | None = None
) -> dict[str, Any]:
    """Scores of ``name`` and of every criterion it is computed from, from statistics already collected.

    Components are scored first (those of the statistics pass, then the per-candidate ones, then the data-free
    ones, each in the order of :func:`components`), then the composites, members before the composites using them.

    Args:
        kind: ``"depth"`` or ``"width"``.
        name: a registered criterion.
        inputs: the statistics and settings (see :class:`ScoreInputs`).
        of: members of the composites involved (see :func:`components`).

    Returns:
        ``{criterion: scores}`` with ``name`` and every component.

    Raises:
        ValueError: for an unknown name or member, or statistics that lack what a criterion needs.
    """
    singles = sorted(components(kind, name, of), key=lambda c: _pass_order(criterion(kind, c)))
    scores: dict[str, Any] = {c: criterion(kind, c).score(inputs) for c in singles}

    def resolve(composite: str) -> None:
        if composite in scores:
            return
        parts = members(kind, composite, of)
        for part in parts:
            resolve(part)
        scores[composite] = criterion(kind, composite).score(replace(inputs, scores=scores, of=parts))

    resolve(criterion(kind, name).name)
    return scores
