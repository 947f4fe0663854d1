"""Calibration statistics of the prunable Linears, one-shot (dense model) or sequential (block by block, pruned inputs).

Each Linear's statistics are the sums of a :class:`~lit_prune.stats.linear.LinearInputStatistics` metric, read as
:class:`~lit_prune.stats.linear.LinearStats` (``needs`` is a subset of ``("hessian", "input_sq", "last_token")``);
pad tokens (``attention_mask == 0``) are left out of every statistic.

Protocols (the Wanda/SparseGPT reference code), both on the pass driver (:mod:`lit_prune.stats.engine`):
:func:`one_shot_stats` hooks the dense model for one pass; :func:`sequential_prune` runs block by block, letting
``prune_block`` change each block before its outputs feed the next, so block ``b + 1`` is calibrated on the outputs
of the *pruned* blocks ``0..b``. Peak memory is one block's inputs (batches × B × T × hidden) plus one block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lit_prune.arch import block_linears
from lit_prune.stats._common import Batches, _check_names
from lit_prune.stats.collect import StatisticsRequest, collect_statistics
from lit_prune.stats.engine import Current, sequential_pass
from lit_prune.stats.hooks import Hooks
from lit_prune.stats.linear import NEEDS, LinearInputCollector, LinearStats, attach_linear_statistics


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
        sync: sum the statistics over DDP ranks (the metrics' ``compute()``; False: this rank's own sums).

    Returns:
        ``{linear name: LinearStats}`` in :func:`~lit_prune.sparse.prunable_linears` order.

    Raises:
        ValueError: if ``needs`` or ``max_batches`` is invalid, a batch is malformed, or there is no batch.
    """
    request = StatisticsRequest(linear=_check_names("needs", needs, NEEDS))  # named as the caller named it
    stats = collect_statistics(
        model, batches, request, max_batches=max_batches, progress=progress, device=device, sync=sync
    ).linear
    assert stats is not None  # requested
    return stats


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

    :func:`~lit_prune.stats.engine.sequential_pass` with pre-hooks on each block's prunable Linears collecting
    ``needs``; ``prune_block(b, stats)`` changes the block's weights in place before the pruned block runs again
    to make block ``b + 1``'s inputs. Runs under ``torch.no_grad()`` in eval mode; modes are restored and every
    hook removed afterwards, also when ``prune_block`` raises.

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
    per_block = block_linears(model)

    def attach(b: int, block: nn.Module, hooks: Hooks, current: Current) -> LinearInputCollector:
        return attach_linear_statistics(hooks, per_block[b], chosen, current, sync_on_compute=sync)

    def on_block(b: int, collector: LinearInputCollector) -> None:
        prune_block(b, collector.compute())  # summed over the ranks when `sync`

    sequential_pass(
        model,
        batches,
        attach,
        on_block,
        max_batches=max_batches,
        progress=progress,
        device=device,
        broadcast=sync,
        desc="Sequential pruning",
    )
