"""``Hooks``: forward (pre-)hooks owned by one object, paused together and always removed."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """Owns forward (pre-)hooks and removes all of them on exit, also when the body raises.

    Lifecycle: enter the context, register with :meth:`forward` / :meth:`forward_pre` (handles are kept), run the
    model; ``__exit__`` calls :meth:`remove`, which removes every handle registered through this object. Inside
    :meth:`paused` none of them runs (a pass driver replays blocks there without disturbing the statistics).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> seen = []
        >>> with Hooks() as hooks:
        ...     _ = hooks.forward(layer, lambda module, args, kwargs, output: seen.append(output.shape))
        ...     _ = layer(torch.zeros(1, 2))
        >>> seen, len(layer._forward_hooks)
        ([torch.Size([1, 2])], 0)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._paused = False

    def _gated(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def gated(*args: Any, **kwargs: Any) -> Any:
            return None if self._paused else hook(*args, **kwargs)

        return gated

    def forward(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(module, args, kwargs, output)`` after ``module``'s forward."""
        handle = module.register_forward_hook(self._gated(hook), with_kwargs=True)
        self._handles.append(handle)
        return handle

    def forward_pre(self, module: nn.Module, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(module, args, kwargs)`` before ``module``'s forward."""
        handle = module.register_forward_pre_hook(self._gated(hook), with_kwargs=True)
        self._handles.append(handle)
        return handle

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, no hook registered through this object runs (they stay registered)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def remove(self) -> None:
        """Remove every hook registered through this object."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
