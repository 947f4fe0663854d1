"""``MethodConfig``: what the frozen option dataclasses of the pruning methods share.

A method's options (:class:`~lit_prune.criteria.depth_config.DepthConfig`,
:class:`~lit_prune.criteria.width_config.WidthConfig`, :class:`~lit_prune.mop.config.MoPConfig`) are a frozen
dataclass that checks every field in ``__post_init__``; its callback builds one from its flat keyword arguments and
its functional API takes one as ``config=`` or its fields as keywords (:meth:`MethodConfig.build`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import Self


class MethodConfig:
    """Mixin of the methods' option dataclasses: :meth:`build` one from a config and keyword replacements."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The option names, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, config: Self | None = None, /, **fields: Any) -> Self:
        """``config`` (or the defaults) with ``fields`` replaced, checked again.

        Raises:
            TypeError: if ``config`` is not an instance of this class, or for a keyword that is not a field
                (naming the fields).
            ValueError: for a bad value (see the class's ``__post_init__``).
        """
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"`config` must be a {cls.__name__} or None, got {type(config).__name__}")
        names = cls.field_names()
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown}; the options are the {cls.__name__} fields {list(names)}")
        return dataclasses.replace(config, **fields) if config is not None else cls(**fields)

    @classmethod
    def for_callback(cls, **fields: Any) -> Self:
        """Build one from a callback's keyword arguments, as a callback reports a bad one.

        Raises:
            MisconfigurationException: with the message of the ``ValueError`` / ``TypeError`` the config raised.
        """
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(str(err)) from None


def check_seed(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (a bool is not a seed).

    Raises:
        ValueError: naming ``seed`` and the value received.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`seed` must be an int, got {value!r}")
