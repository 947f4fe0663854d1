"""Argument checks shared by the public functions and constructors (one message format everywhere)."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum`` (or None when allowed).

    Booleans are rejected although they are ints, since ``True`` is never a meaningful count.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
