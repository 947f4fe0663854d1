"""Argument checks shared by the public functions and constructors (one message format everywhere)."""

from __future__ import annotations

import math
from collections.abc import Collection


def check_int(name: str, value: object, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum`` (or None when allowed).

    Booleans are rejected although they are ints, since ``True`` is never a meaningful count.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


def check_choice(name: str, value: object, allowed: Collection[str]) -> None:
    """Raise ``ValueError`` naming ``name``, the allowed values and ``value`` unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}")


def check_number(name: str, value: object, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    """``float(value)`` if it is a finite number in ``[low, high)`` (``(low, high)`` if ``open_low``), else raise.

    Raises:
        ValueError: naming ``name``, the interval and ``value`` (booleans are not numbers here).
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    v = float(value) if ok else math.nan  # type: ignore[arg-type]
    if not ok or v < low or v >= high or (open_low and v == low):
        interval = f"{'(' if open_low else '['}{low}, {high})"
        raise ValueError(f"`{name}` must be a finite number in {interval}, got {value!r}")
    return v
