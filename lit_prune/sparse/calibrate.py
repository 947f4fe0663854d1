"""Calibration statistics of the prunable Linears, one-shot (dense model) or sequential (block by block, pruned inputs).

Each Linear's statistics are the sums of :class:`~lit_prune.sparse.LinearStats` (``needs`` is a subset of
``("hessian", "input_sq", "last_token")``); pad tokens (``attention_mask == 0``) are left out of every statistic.

Protocols (the Wanda/SparseGPT reference code): :func:`one_shot_stats` hooks the dense model for one pass;
:func:`sequential_prune` captures block 0's inputs, then per block collects its Linears' statistics, lets
``prune_block`` change the block in place and re-runs it, so block ``b + 1`` is calibrated on the outputs of the
*pruned* blocks ``0..b``. Peak memory is the captured hidden states (batches × B × T × hidden) plus one block.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_prune._validation import check_int
from lit_prune.arch import adapter_for
from lit_prune.eval._common import evaluating
from lit_prune.sparse.linear_stats import NEEDS, LinearStats, all_reduce_stats
from lit_prune.sparse.masks import block_linears
from lit_prune.stats._common import Batches, _as_inputs, _check_names, _iterate, hooked_pass
from lit_prune.stats.hooks import Hooks
from lit_prune.stats.replay import BlockCalls, capture_until


class _SharedInputs:
    """Linears called on the very same input tensor (q/k/v, gate/up) update one statistics object; the others copy it.

    The previous hook's input is held, so an ``is`` match cannot be a recycled object.
    """

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.owner: LinearStats | None = None
        self.copies: dict[int, tuple[LinearStats, LinearStats]] = {}

    def finish(self) -> None:
        """Give every copy its owner's sums (cloned: criteria may treat them independently), drop the held input."""
        for copy, owner in self.copies.values():
            copy.count = owner.count
            copy.input_sq = None if owner.input_sq is None else owner.input_sq.clone()
            copy.hessian_sum = None if owner.hessian_sum is None else owner.hessian_sum.clone()
            copy.last_inputs = None if owner.last_inputs is None else owner.last_inputs.clone()
        self.x, self.owner = None, None


def _collector(stats: LinearStats, current: Mapping[str, Tensor | None], shared: _SharedInputs) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        if x is shared.x and shared.owner is not None:
            shared.copies[id(stats)] = (stats, shared.owner)
            return
        shared.x, shared.owner = x, stats
        stats.update(x, current["attention_mask"])

    return hook


def _attach(
    hooks: Hooks,
    linears: Mapping[str, nn.Linear],
    needs: frozenset[str],
    current: Mapping[str, Tensor | None],
    shared: _SharedInputs,
) -> dict[str, LinearStats]:
    """Empty statistics for ``linears`` and the pre-hooks that fill them (with ``current["attention_mask"]``).

    Call ``shared.finish()`` after the passes: Linears that shared an input get their copy of the sums then.
    """
    stats = {name: LinearStats.empty(lin.in_features, needs, lin.weight.device) for name, lin in linears.items()}
    for name, lin in linears.items():
        hooks.forward_pre(lin, _collector(stats[name], current, shared))
    return stats


def one_shot_stats(
    model: nn.Module,
    batches: Batches,
    needs: Iterable[str],
    progress: bool = False,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    sync: bool = True,
) -> dict[str, LinearStats]:
    """Statistics of every prunable Linear of the model as it is, from one pass over ``batches``.

    Args:
        model: a Hugging Face model or a wrapper around one (see :func:`lit_prune.arch.unwrap`).
        batches: a ``(B, T)`` LongTensor, or batches that are such tensors or dicts with ``input_ids`` (and
            ``attention_mask``).
        needs: a non-empty subset of ``("hessian", "input_sq", "last_token")``.
        progress: show a progress bar.
        max_batches: use at most this many batches.
        device: where to run (None: where the model is).
        sync: sum the statistics over DDP ranks (:func:`all_reduce_stats`).

    Returns:
        ``{linear name: LinearStats}`` in :func:`~lit_prune.sparse.prunable_linears` order.

    Raises:
        ValueError: if ``needs`` or ``max_batches`` is invalid, a batch is malformed, or there is no batch.
    """
    chosen = _check_names("needs", needs, NEEDS)
    shared = _SharedInputs()

    def attach(hf_model: nn.Module, hooks: Hooks, current: dict[str, Tensor | None]) -> dict[str, LinearStats]:
        linears = {name: lin for block in block_linears(hf_model) for name, lin in block.items()}
        return _attach(hooks, linears, chosen, current, shared)

    stats: dict[str, LinearStats] = hooked_pass(
        model, batches, attach, max_batches=max_batches, progress=progress, device=device, desc="Calibrating"
    )
    shared.finish()
    return dict(all_reduce_stats(stats)) if sync else stats


@dataclass
class _Inputs:
    """One calibration batch as the current block receives it."""

    hidden: Tensor  # (B, T, d): input of the current block
    calls: BlockCalls  # what the decoder passed the blocks that are kwarg sources (masks, rotary embeddings, ...)
    attention_mask: Tensor | None  # (B, T) padding mask of the batch, for the statistics


def _kwarg_sources(model: nn.Module, num_blocks: int) -> list[int]:
    """For each block, the block whose captured keyword arguments it takes.

    Blocks get the same kwargs from the model except under mixed ``config.layer_types`` (e.g. Qwen2/3 sliding and
    full attention), where each type gets its own attention mask: then the first block of each type is the source.
    """
    layer_types = getattr(adapter_for(model).config(model), "layer_types", None)
    if not layer_types or len(set(layer_types[:num_blocks])) <= 1:
        return [0] * num_blocks
    if len(layer_types) < num_blocks:
        raise ValueError(f"`config.layer_types` has {len(layer_types)} entries for {num_blocks} blocks")
    first: dict[str, int] = {}
    return [first.setdefault(kind, b) for b, kind in enumerate(layer_types[:num_blocks])]


def _capture(hf_model: nn.Module, sources: list[int], items: Iterable[Any], target: torch.device) -> list[_Inputs]:
    """Run the decoder on each batch up to the last kwarg source block; keep block 0's inputs and the sources' calls."""
    adapter = adapter_for(hf_model)
    decoder = adapter.decoder(hf_model)
    captured: list[_Inputs] = []
    for ids, mask in items:
        mask = None if mask is None else mask.to(target)
        forward = functools.partial(adapter.forward_decoder, hf_model, ids.to(target), mask)
        calls = capture_until(decoder, adapter.layers_attr, sources, forward)
        assert calls.first_input is not None  # recorded at block 0
        captured.append(_Inputs(calls.first_input, calls, mask))
    return captured


def _run_block(block: nn.Module, inputs: _Inputs, source: int) -> Tensor:
    return inputs.calls.run(block, source, inputs.hidden)


def _broadcast_block(block: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers of ``block`` (no-op outside DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*block.parameters(), *block.buffers()]:
            dist.broadcast(tensor.data, src=0)


def sequential_prune(
    model: nn.Module,
    batches: Batches,
    needs: Iterable[str],
    prune_block: Callable[[int, dict[str, LinearStats]], None],
    progress: bool = False,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    sync: bool = True,
) -> None:
    """Prune block by block, calibrating each block on the outputs of the already pruned blocks before it.

    Lifecycle: :func:`~lit_prune.stats.replay.capture_until` records each batch's block-0 hidden states and the
    keyword arguments the model passes its blocks (attention mask, rotary embeddings, position ids); the blocks after
    the last one it needs do not run. For each block
    ``b``: run it on the captured inputs with pre-hooks on its prunable Linears collecting ``needs``, call
    ``prune_block(b, stats)``, which changes the block's weights in place, then run the pruned block again to make
    block ``b + 1``'s inputs. Runs under ``torch.no_grad()`` in eval mode; modes are restored and every hook removed
    afterwards, also when ``prune_block`` raises.

    Args:
        model: a Hugging Face model or a wrapper around one (see :func:`lit_prune.arch.unwrap`).
        batches: as in :func:`one_shot_stats`; all are held (as hidden states) at once.
        needs: a non-empty subset of ``("hessian", "input_sq", "last_token")``.
        prune_block: ``prune_block(b, {linear name: LinearStats})`` for each block in order.
        progress: show a progress bar over the blocks.
        max_batches: use at most this many batches.
        device: where to run (None: where the model is).
        sync: under DDP, sum each block's statistics over the ranks before ``prune_block`` and then broadcast the
            block's parameters and buffers from rank 0, so every rank holds identical weights. Every rank must call
            this with the same number of blocks.

    Raises:
        ValueError: if ``needs`` or ``max_batches`` is invalid, a batch is malformed, or there is no batch.
    """
    chosen = _check_names("needs", needs, NEEDS)
    check_int("max_batches", max_batches, allow_none=True)
    items, _ = _iterate(batches, max_batches)
    parsed = [_as_inputs(item) for item in items]
    if not parsed:
        raise ValueError("`batches` is empty: no calibration batch to collect statistics from")
    with evaluating(model, device) as (hf_model, target), torch.no_grad():
        adapter = adapter_for(hf_model)
        blocks = adapter.blocks(hf_model)
        sources = _kwarg_sources(hf_model, len(blocks))
        captured = _capture(hf_model, sources, parsed, target)
        current: dict[str, Tensor | None] = {"attention_mask": None}
        per_block = block_linears(hf_model)
        for b in tqdm(range(len(blocks)), desc="Sequential pruning", disable=not progress, leave=False):
            shared = _SharedInputs()
            with Hooks() as hooks:
                stats = _attach(hooks, per_block[b], chosen, current, shared)
                for inputs in captured:
                    current["attention_mask"] = inputs.attention_mask
                    _run_block(blocks[b], inputs, sources[b])
            shared.finish()
            if sync:
                all_reduce_stats(stats)
            prune_block(b, stats)
            del stats
            if sync:
                _broadcast_block(blocks[b])
            if b + 1 < len(blocks):
                for inputs in captured:
                    inputs.hidden = _run_block(blocks[b], inputs, sources[b])
