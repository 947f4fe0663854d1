"""Per-layer sparsity for unstructured pruning: how many weights each block (and each row, with TRIM) loses.

A *layer* is a transformer block: all its prunable Linear weights share the block's ratio, and ``sizes[l]`` counts
them. ``sparsity`` ``S`` is the mean over all prunable weights, i.e. the ``sizes``-weighted mean of the ratios, and
:func:`layer_counts` turns ratios into integer counts that meet it exactly. Formulas: ``METHODS.md`` §5.

* :func:`uniform`: ``S`` in every block.
* :func:`owl` (Yin et al., 2024) on :func:`outlier_ratio`: more outliers, less sparsity, in ``[S-λ, S+λ]``.
* :func:`linear_map` (AlphaPruning, LayerIF): any per-layer score, in ``[S(1-ε), S(1+ε)]``.
* :func:`dsa` (Li et al., 2024): an :class:`AllocationFunction` (operator chain) on each block's scores, ±λ too.
* :func:`~lit_prune.allocation.trim.trim` (Beck et al., 2025; its own module): per-row counts inside one Linear, on top
  of any layer ratio.

The three band maps share one rule: min–max normalise the values to ``t ∈ [0, 1]``, place them linearly in the band
(``lo + (hi-lo)·t``, or ``hi - (hi-lo)·t`` when higher values must be *denser*), then add the one constant that makes
the weighted mean exactly ``S``. With equal sizes this is the OWL/DSA reference code (``x - mean(x) + S``), whose
shifted values can leave the band (up to ``S ± 2λ`` when one layer is far from the rest); here the shifted values are
clipped into the band and the constant is re-solved (bisection) so that the mean stays ``S``: outer layers saturate at
the band's edges. All-equal values (or a zero-width band) give :func:`uniform`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Literal

import torch
from torch import Tensor

from lit_prune._validation import check_int

log = logging.getLogger(__name__)

SPARSITY_ALLOCATIONS = ("uniform", "owl", "linear_map", "dsa")
DSA_PAPER_FUNCTION = "log|log|abs|geomean|cos|exp"
"""The DSA paper's best function, ``exp(cos(geomean |ln(ln|S|)|))``, written with this module's operators."""
_DIRECTIONS = ("sparser", "denser")
_TINY = 1e-12
"""Added before a logarithm: ``log(|x| + 1e-12)``, so that a zero score is finite."""
_F64 = torch.float64


# --- validation --------------------------------------------------------------------------------------------------
def _real(name: str, value: object, low: float, high: float, *, open_low: bool, open_high: bool) -> float:
    """``float(value)`` if it is a number in the interval (bounds open or closed); otherwise ``ValueError``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    v = float(value) if ok else math.nan  # type: ignore[arg-type]
    if not ok or v < low or v > high or (open_low and v == low) or (open_high and v == high):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return v


def _sparsity(value: object) -> float:
    return _real("sparsity", value, 0.0, 1.0, open_low=True, open_high=True)


def _values(name: str, values: Sequence[float]) -> Tensor:
    """The per-layer numbers as a float64 vector; ``ValueError`` if empty, not numbers or not finite."""
    try:
        out = torch.tensor([float(v) for v in values], dtype=_F64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a sequence of numbers, got {values!r}") from err
    if out.numel() == 0 or not bool(torch.isfinite(out).all()):
        raise ValueError(f"`{name}` must hold at least one value, all finite, got {out.tolist()}")
    return out


def _weights(sizes: Sequence[int] | None, n: int) -> Tensor:
    """``sizes`` as float64 weights (all ones when None); ``ValueError`` unless ``n`` ints >= 1."""
    if sizes is None:
        return torch.ones(n, dtype=_F64)
    if len(sizes) != n:
        raise ValueError(f"`sizes` must hold one entry per layer ({n}), got {len(sizes)}")
    for i, size in enumerate(sizes):
        check_int(f"sizes[{i}]", size, minimum=1)
    return torch.tensor([float(s) for s in sizes], dtype=_F64)


def _band(sparsity: float, lo: float, hi: float, what: str) -> tuple[float, float]:
    """``(lo, hi)`` if the band lies in ``[0, 1)`` (tiny negative float noise is clipped to 0); otherwise raise."""
    if lo < -1e-12 or hi >= 1.0:
        raise ValueError(
            f"`sparsity`={sparsity} with {what} gives the band [{lo:.6g}, {hi:.6g}], which leaves [0, 1); "
            "lower the band's width or move `sparsity`"
        )
    return max(lo, 0.0), hi


def _direction(higher: object) -> None:
    if higher not in _DIRECTIONS:
        raise ValueError(f"`higher` must be one of {list(_DIRECTIONS)}, got {higher!r}")


def _tensors(name: str, scores: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """One layer's score tensors as a list; ``TypeError``/``ValueError`` if not tensors or all empty."""
    tensors = [scores] if isinstance(scores, Tensor) else list(scores)
    if not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(
            f"`{name}` must be a Tensor or a sequence of Tensors, got {[type(t).__name__ for t in tensors]}"
        )
    if sum(t.numel() for t in tensors) == 0:
        raise ValueError(f"`{name}` must hold at least one score, got {len(tensors)} empty tensor(s)")
    return tensors


# --- shared numerics ---------------------------------------------------------------------------------------------
def _mean(x: Tensor, w: Tensor) -> float:
    return float((x * w).sum() / w.sum())


def _shift_into_band(x: Tensor, w: Tensor, lo: float, hi: float, target: float) -> Tensor:
    """``clip(x + c, lo, hi)`` with the one ``c`` that makes its ``w``-weighted mean ``target`` (in ``[lo, hi]``)."""
    c = target - _mean(x, w)
    if float(x.min()) + c >= lo and float(x.max()) + c <= hi:
        return x + c
    a, b = lo - float(x.max()), hi - float(x.min())  # the clipped mean is lo at a, hi at b, non-decreasing between
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid in (a, b):
            break
        if _mean((x + mid).clamp(lo, hi), w) < target:
            a = mid
        else:
            b = mid
    return (x + 0.5 * (a + b)).clamp(lo, hi)


def _to_band(values: Tensor, w: Tensor, lo: float, hi: float, target: float, higher: str) -> list[float]:
    """Min–max ``values`` into ``[lo, hi]`` (see the module docstring), weighted mean ``target``."""
    span = float(values.max() - values.min())
    if span == 0.0 or hi == lo:
        return [target] * values.numel()
    t = (values - values.min()) / span
    if higher == "denser":
        t = 1.0 - t
    return _shift_into_band(lo + (hi - lo) * t, w, lo, hi, target).tolist()


def _integer_counts(real: Tensor, caps: Tensor, target: int) -> Tensor:
    """Ints in ``[0, caps]`` summing to ``target`` (``<= caps.sum()``): ``real`` rounded by largest remainders.

    A gap between ``real.sum()`` and ``target`` is first spread in proportion to each entry's room (``caps - real``
    when adding, ``real`` when removing), so the rounding only has to move each entry by less than one.
    """
    capf = caps.to(_F64)
    real = torch.minimum(real.to(_F64).clamp(min=0.0), capf)
    gap = target - float(real.sum())
    room = capf - real if gap > 0 else real
    if gap != 0 and float(room.sum()) > 0:
        real = torch.minimum((real + gap * room / room.sum()).clamp(min=0.0), capf)
    counts = real.floor().long()
    rest = real - counts
    short = target - int(counts.sum())
    while short != 0:  # one pass unless float noise left more than one unit per entry
        grow = short > 0
        ok = counts < caps if grow else counts > 0
        key = torch.where(ok, rest if grow else -rest, torch.full_like(rest, -math.inf))
        picked = torch.argsort(key, descending=True, stable=True)[: min(abs(short), int(ok.sum()))]
        counts[picked] += 1 if grow else -1
        short = target - int(counts.sum())
    return counts


# --- layer ratios ------------------------------------------------------------------------------------------------
def uniform(sizes: Sequence[int], sparsity: float) -> list[float]:
    """``sparsity`` for every layer (``sizes`` only fixes the number of layers and is validated).

    Example:
        >>> uniform([10, 20], 0.5)
        [0.5, 0.5]
    """
    s = _sparsity(sparsity)
    if len(sizes) == 0:
        raise ValueError("`sizes` must hold at least one layer, got none")
    return [s] * _weights(sizes, len(sizes)).numel()


def outlier_ratio(scores: Tensor | Sequence[Tensor], m: float) -> float:
    """OWL's layer outlier ratio ``D_l``: the fraction of a block's scores greater than ``m`` times their mean.

    As in the OWL code (``check_outlier_mean`` on the concatenated, flattened Wanda scores of every Linear of the
    block), the mean is taken over *all* of the block's scores together, not per Linear. The OWL code returns a
    percentage; this is the fraction (the min–max map in :func:`owl` does not depend on the scale).

    Args:
        scores: the block's per-weight scores (e.g. Wanda ``|W|·‖X‖``), one tensor per Linear, any shapes.
        m: the outlier threshold ``M`` (the paper uses 3 to 10; 5 or 7 for LLaMA), > 0.

    Example:
        >>> import torch
        >>> outlier_ratio([torch.tensor([1.0, 1.0, 1.0]), torch.tensor([[1.0, 16.0]])], m=3.0)  # mean 4, above 12
        0.2
    """
    tensors = _tensors("scores", scores)
    mult = _real("m", m, 0.0, math.inf, open_low=True, open_high=True)
    total = sum(t.numel() for t in tensors)
    threshold = mult * sum(float(t.detach().sum(dtype=_F64)) for t in tensors) / total
    return sum(int((t.detach() > threshold).sum()) for t in tensors) / total


def owl(
    outlier_ratios: Sequence[float], sparsity: float, lam: float = 0.08, sizes: Sequence[int] | None = None
) -> list[float]:
    """OWL layer ratios: min–max normalise ``D_l`` into ``[S-λ, S+λ]``, more outliers -> less sparsity, mean ``S``.

    Args:
        outlier_ratios: ``D_l`` per block (:func:`outlier_ratio`, on the dense model).
        sparsity: ``S``, the sparsity over all prunable weights, in (0, 1).
        lam: ``λ``, the band's half-width (0.08 in the paper; 0 gives uniform).
        sizes: prunable weights per block; the mean is weighted by them (None: equal blocks, as in the OWL code).

    Returns:
        One sparsity per block in ``[S-λ, S+λ]`` (clipped: see the module docstring), ``sizes``-weighted mean ``S``.

    Raises:
        ValueError: if ``S`` is not in (0, 1), ``λ`` is negative, ``[S-λ, S+λ]`` leaves ``[0, 1)``, the ratios are
            empty or not finite, or ``sizes`` does not hold one int >= 1 per block.

    Example:
        >>> [round(r, 4) for r in owl([1.0, 2.0, 3.0], sparsity=0.7, lam=0.08)]
        [0.78, 0.7, 0.62]
    """
    s = _sparsity(sparsity)
    lam = _real("lam", lam, 0.0, math.inf, open_low=False, open_high=True)
    lo, hi = _band(s, s - lam, s + lam, f"`lam`={lam}")
    ratios = _values("outlier_ratios", outlier_ratios)
    return _to_band(ratios, _weights(sizes, ratios.numel()), lo, hi, s, "denser")


def linear_map(
    scores: Sequence[float],
    sparsity: float,
    eps: float,
    sizes: Sequence[int] | None = None,
    higher: Literal["sparser", "denser"] = "sparser",
) -> list[float]:
    """AlphaPruning / LayerIF ratios: per-layer scores mapped linearly into ``[S(1-ε), S(1+ε)]``, mean ``S``.

    LayerIF (influence scores) and AlphaPruning (heavy-tail exponent α) give *higher score -> more sparsity*, the
    default. AlphaPruning rescales its ratios multiplicatively to the target; here they are shifted (and clipped into
    the band) like the other maps, so the band is exact.

    Args:
        scores: one number per block.
        sparsity: ``S`` in (0, 1).
        eps: ``ε`` in [0, 1] (0.1 to 0.3 in LayerIF); 0 gives uniform.
        sizes: prunable weights per block, for the weighted mean (None: equal).
        higher: ``"sparser"`` or ``"denser"``: what a higher score gets.

    Raises:
        ValueError: if an argument is out of range, ``S(1+ε) >= 1``, or ``higher`` is not an allowed value.

    Example:
        >>> [round(r, 4) for r in linear_map([0.0, 1.0, 2.0], sparsity=0.5, eps=0.2)]
        [0.4, 0.5, 0.6]
    """
    s = _sparsity(sparsity)
    eps = _real("eps", eps, 0.0, 1.0, open_low=False, open_high=False)
    _direction(higher)
    lo, hi = _band(s, s * (1 - eps), s * (1 + eps), f"`eps`={eps}")
    values = _values("scores", scores)
    return _to_band(values, _weights(sizes, values.numel()), lo, hi, s, higher)


# --- DSA allocation functions -------------------------------------------------------------------------------------
_PRE: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "abs": torch.abs,
    "neg": torch.neg,
    "log": lambda x: torch.log(x.abs() + _TINY),
    "sqrt": lambda x: x.abs().sqrt(),
    "square": torch.square,
    "exp": torch.exp,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
_REDUCE: dict[str, Callable[[Tensor], float]] = {
    "mean": lambda x: float(x.mean(dtype=_F64)),
    "geomean": lambda x: math.exp(float(torch.log(x.abs() + _TINY).mean(dtype=_F64))),
    "median": lambda x: float(x.median()),
    "max": lambda x: float(x.max()),
    "min": lambda x: float(x.min()),
    "std": lambda x: float(x.double().std(correction=0)),
    "var": lambda x: float(x.double().var(correction=0)),
    "l1": lambda x: float(x.abs().mean(dtype=_F64)),
    "l2": lambda x: math.sqrt(float(x.square().mean(dtype=_F64))),
}
_POST: dict[str, Callable[[float], float]] = {
    "identity": lambda v: v,
    "abs": abs,
    "neg": lambda v: -v,
    "log": lambda v: math.log(abs(v) + _TINY),
    "exp": lambda v: math.exp(v) if v < 700.0 else math.inf,
    "sqrt": lambda v: math.sqrt(abs(v)),
    "square": lambda v: v * v,
    "sin": math.sin,
    "cos": math.cos,
    "tanh": math.tanh,
    "atan": math.atan,
    "sigmoid": lambda v: 0.5 * (1.0 + math.tanh(0.5 * v)),
}


@dataclass(frozen=True)
class AllocationFunction:
    """A DSA allocation function: element-wise ``pre`` ops, one ``reduce`` to a scalar, then scalar ``post`` ops.

    Evaluated on one block's scores (each Linear's tensor transformed, then all concatenated). ``log`` is
    ``log(|x| + 1e-12)``, ``sqrt`` is ``sqrt(|x|)``; ``geomean`` is ``exp(mean(log(|x| + 1e-12)))`` (the DSA code's
    ``prod(x)**(1/n)`` underflows); ``std``/``var`` are population moments; ``l1`` = ``mean|x|``, ``l2`` =
    ``sqrt(mean x²)`` (size-normalised, so that blocks of different sizes compare); ``median`` is the lower median.

    Args:
        pre: element-wise ops applied in order, from ``identity, abs, neg, log, sqrt, square, exp, sigmoid, tanh``.
        reduce: one of ``mean, geomean, median, max, min, std, var, l1, l2``.
        post: scalar ops applied in order, from ``identity, abs, neg, log, exp, sqrt, square, sin, cos, tanh, atan,
            sigmoid``.

    Raises:
        ValueError: if an operator name is unknown (the message lists the allowed ones).

    Example:
        >>> import torch
        >>> fn = AllocationFunction.parse(DSA_PAPER_FUNCTION)
        >>> fn
        AllocationFunction(pre=('log', 'log', 'abs'), reduce='geomean', post=('cos', 'exp'))
        >>> str(fn), round(AllocationFunction.parse("abs|mean|square")(torch.tensor([-1.0, 3.0])), 6)
        ('log|log|abs|geomean|cos|exp', 4.0)
    """

    pre: tuple[str, ...] = ()
    reduce: str = "mean"
    post: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pre", tuple(self.pre))
        object.__setattr__(self, "post", tuple(self.post))
        for kind, names, table in (
            ("pre", self.pre, _PRE),
            ("reduce", (self.reduce,), _REDUCE),
            ("post", self.post, _POST),
        ):
            for name in names:
                if name not in table:
                    raise ValueError(f"`{kind}` operators must be among {sorted(table)}, got {name!r}")

    @classmethod
    def parse(cls, spec: str) -> AllocationFunction:
        """Read ``"pre|...|reduce|post|..."`` (case-insensitive), e.g. :data:`DSA_PAPER_FUNCTION`."""
        if not isinstance(spec, str):
            raise TypeError(f"`spec` must be a str, got {type(spec).__name__}")
        tokens = [t.strip().lower() for t in spec.split("|")]
        at = [i for i, t in enumerate(tokens) if t in _REDUCE]
        if len(at) != 1:
            raise ValueError(
                f"`spec` must hold exactly one reduction among {sorted(_REDUCE)}, between the element-wise and the "
                f"scalar ops (e.g. {DSA_PAPER_FUNCTION!r}), got {spec!r}"
            )
        return cls(pre=tuple(tokens[: at[0]]), reduce=tokens[at[0]], post=tuple(tokens[at[0] + 1 :]))

    def __str__(self) -> str:
        return "|".join((*self.pre, self.reduce, *self.post))

    def __call__(self, scores: Tensor | Sequence[Tensor]) -> float:
        """The function's value on one block's scores; ``ValueError`` if it is not finite."""
        parts = []
        for t in _tensors("scores", scores):
            x = t.detach().flatten()
            x = x if x.dtype == _F64 else x.float()
            for name in self.pre:
                x = _PRE[name](x)
            parts.append(x)
        value = _REDUCE[self.reduce](torch.cat(parts))
        for name in self.post:
            value = _POST[name](value)
        if not math.isfinite(value):
            raise ValueError(f"allocation function {str(self)!r} is not finite on these scores (got {value})")
        return value


def dsa(
    scores: Sequence[Sequence[Tensor] | Tensor],
    function: AllocationFunction | str,
    sparsity: float,
    lam: float = 0.08,
    sizes: Sequence[int] | None = None,
    higher: Literal["sparser", "denser"] = "sparser",
) -> list[float]:
    """DSA layer ratios: ``function`` on each block's scores, mapped into ``[S-λ, S+λ]`` with mean ``S``.

    The default direction follows the DSA code (``lib/prune_all.py``: values min–max scaled, then ``1 - v`` taken as
    the *density* band), so a higher value gets *more* sparsity; its searched functions (such as
    :data:`DSA_PAPER_FUNCTION`) were found in that direction. OWL's outlier ratio goes the other way
    (``higher="denser"``).

    Args:
        scores: per block, its score tensor(s) (e.g. the Wanda scores of all its Linears, on the dense model).
        function: an :class:`AllocationFunction` or its string form (:meth:`AllocationFunction.parse`).
        sparsity: ``S`` in (0, 1).
        lam: ``λ``, the band's half-width, as in :func:`owl`.
        sizes: prunable weights per block, for the weighted mean (None: equal).
        higher: ``"sparser"`` or ``"denser"``: what a higher function value gets.

    Raises:
        ValueError: as :func:`owl`, for an unknown operator or direction, or a non-finite function value.
        TypeError: if ``function`` is neither an :class:`AllocationFunction` nor a str.

    Example:
        >>> import torch
        >>> blocks = [torch.full((4,), 1.0), torch.full((4,), 2.0), torch.full((4,), 3.0)]
        >>> [round(r, 4) for r in dsa(blocks, "mean", sparsity=0.6, lam=0.05)]
        [0.55, 0.6, 0.65]
    """
    fn = AllocationFunction.parse(function) if isinstance(function, str) else function
    if not isinstance(fn, AllocationFunction):
        raise TypeError(f"`function` must be an AllocationFunction or a str, got {type(function).__name__}")
    s = _sparsity(sparsity)
    lam = _real("lam", lam, 0.0, math.inf, open_low=False, open_high=True)
    _direction(higher)
    lo, hi = _band(s, s - lam, s + lam, f"`lam`={lam}")
    values = _values("scores (function values)", [fn(block) for block in scores])
    return _to_band(values, _weights(sizes, values.numel()), lo, hi, s, higher)


# --- integer counts ----------------------------------------------------------------------------------------------
def layer_counts(ratios: Sequence[float], sizes: Sequence[int], sparsity: float) -> list[int]:
    """Weights to prune per layer: ``ratios[l]·sizes[l]`` rounded so the total is exactly ``round(S·Σsizes)``.

    Largest-remainder rounding (Python's ``round``, half to even, for the total); if the ratios' weighted mean is not
    ``S``, the difference is first spread over the layers in proportion to their room (unpruned weights when adding,
    pruned ones when removing). Every count is in ``[0, sizes[l]]``.

    Raises:
        ValueError: if ``S`` is not in (0, 1), a ratio is not in [0, 1], or the lengths or sizes are invalid.

    Example:
        >>> layer_counts([0.3, 0.5, 0.7], [10, 10, 10], 0.5)
        [3, 5, 7]
        >>> layer_counts([0.4, 0.6], [10, 5], 0.5)  # mean 0.4667: the missing 0.5 weights go where there is room
        [5, 3]
    """
    s = _sparsity(sparsity)
    values = _values("ratios", ratios)
    if bool((values < 0).any()) or bool((values > 1).any()):
        raise ValueError(f"`ratios` must all lie in [0, 1], got {values.tolist()}")
    w = _weights(sizes, values.numel())
    return _integer_counts(values * w, w.long(), round(s * float(w.sum()))).tolist()
