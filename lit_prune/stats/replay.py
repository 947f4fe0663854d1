"""Capture what the decoder passes its blocks, and replay a block on other hidden states with the same arguments.

The one capture-and-replay mechanism of lit-prune: the per-candidate statistics record every block during a
reference forward (:class:`BlockCalls` with hooks), the sequential calibration records block 0's input and the
arguments of a few blocks and stops there (:func:`capture_until`). Stopping needs no exception: the decoder runs
with its block list cut after the last block wanted, whose place a recorder takes that returns its input unchanged,
so the forward ends normally (only the final norm runs on the recorded hidden states).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.stats._common import _block_output
from lit_prune.stats.hooks import Hooks

_NO_CACHE = (("use_cache", False), ("past_key_values", None), ("cache", None))
"""Keyword arguments a replayed block must not take from the capture: a replay never reads or writes a KV cache."""


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, tuple[Any, ...], dict[str, Any]]:
    """``(hidden states, other positional args, keyword args without the cache)`` of one block call."""
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    for key, value in _NO_CACHE:
        if key in kwargs:
            kwargs[key] = value
    return hidden, tuple(args[1:]), kwargs


class BlockCalls:
    """What the decoder passed to some of its blocks in one forward: block 0's input and each block's arguments.

    Register with :meth:`attach` (forward pre-hooks, removed with the :class:`Hooks`), run the decoder, then
    :meth:`run` a block on any hidden states with its recorded causal mask, rotary embeddings and position ids.

    Args:
        blocks: the decoder's blocks.
        which: indices of the blocks whose arguments to keep (None: all).
    """

    def __init__(self, blocks: nn.ModuleList, which: Iterable[int] | None = None) -> None:
        self.blocks = blocks
        self.which = sorted(set(range(len(blocks)) if which is None else which))
        self.first_input: Tensor | None = None
        self.calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def _hook(self, index: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.record(index, args, kwargs)

        return pre_hook

    def record(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Keep block ``index``'s call (and, for block 0, its input hidden states)."""
        hidden, rest, kw = _split_call(args, kwargs)
        if index == 0:
            self.first_input = hidden
        self.calls[index] = (rest, kw)

    def attach(self, hooks: Hooks) -> None:
        """Record the chosen blocks' calls through ``hooks``."""
        for index in self.which:
            hooks.forward_pre(self.blocks[index], self._hook(index))

    def clear(self) -> None:
        """Drop what was recorded (before the next batch)."""
        self.first_input = None
        self.calls = {}

    def run(self, block: nn.Module, index: int, hidden: Tensor) -> Tensor:
        """``block`` on ``hidden`` with the arguments recorded for block ``index``.

        Raises:
            RuntimeError: if block ``index`` was not called while recording.
        """
        call = self.calls.get(index)
        if call is None:
            raise RuntimeError(f"Block {index} was not called during the recorded forward; cannot replay it")
        args, kwargs = call
        return _block_output(block(hidden, *args, **kwargs))


class _Recorder(nn.Module):
    """Takes the place of the last block a capture needs: records its call, returns its input unchanged."""

    def __init__(self, calls: BlockCalls, index: int) -> None:
        super().__init__()
        self.calls = calls
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls.record(self.index, args, kwargs)
        return args[0] if args else kwargs["hidden_states"]


def capture_until(
    decoder: nn.Module,
    layers_attr: str,
    which: Iterable[int],
    forward: Callable[[], Any],
) -> BlockCalls:
    """Run ``forward()`` (the decoder on one batch) only up to the last block in ``which`` and record those calls.

    The decoder's block list is replaced for the call by the blocks before that one plus a recorder in its place,
    then restored (also when the forward raises); the blocks after it never run.

    Args:
        decoder: the module holding the blocks as attribute ``layers_attr``.
        layers_attr: the attribute name (``"layers"``).
        which: block indices whose calls to record (block 0's input hidden states are always kept).
        forward: runs the decoder once.

    Returns:
        The recorded calls.

    Raises:
        RuntimeError: if the decoder never reached the last block wanted.
    """
    blocks: nn.ModuleList = getattr(decoder, layers_attr)
    wanted = sorted(set(which) | {0})
    stop = wanted[-1]
    calls = BlockCalls(blocks, wanted[:-1])
    with Hooks() as hooks:
        calls.attach(hooks)
        setattr(decoder, layers_attr, nn.ModuleList([*blocks[:stop], _Recorder(calls, stop)]))
        try:
            with torch.no_grad():
                forward()
        finally:
            setattr(decoder, layers_attr, blocks)
    if stop not in calls.calls:
        raise RuntimeError(f"The decoder never called block {stop}: cannot capture the block inputs")
    return calls
