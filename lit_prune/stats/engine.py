"""The pass driver: every calibration pass of lit-prune over a model runs here.

Two protocols:

* :func:`run_pass` (one-shot): the model as it is, every batch forwarded once through
  :meth:`~lit_prune.arch.ModelAdapter.forward_decoder` (or ``forward_logits`` when the LM head is wanted), with the
  hooks of any number of statistics attached at once, so a set of criteria costs one pass. An optional per-batch
  step runs after each forward with the hooks paused (the per-candidate statistics replay blocks there).
* :func:`sequential_pass` (block by block): block ``b`` runs on the outputs of blocks ``0..b-1`` *as the caller left
  them* (Wanda/SparseGPT's protocol); it holds one block's inputs for every batch, never the whole model's
  activations.

Both run under ``torch.no_grad()`` in eval mode, restore every module's mode and remove every hook afterwards, also
when a step raises. The forward entry points are the adapter's, so a sharded model is unsharded in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_prune._validation import check_int
from lit_prune.arch import ModelAdapter, adapter_for
from lit_prune.eval._common import evaluating
from lit_prune.stats._common import Batches, _as_inputs, _iterate
from lit_prune.stats.hooks import Hooks
from lit_prune.stats.replay import BlockCalls, capture_until

Current = dict[str, Tensor | None]
"""What hooks read while a batch runs: ``current["attention_mask"]`` is the batch's ``(B, T)`` padding mask or None."""

Attach = Callable[[nn.Module, Hooks, Current], Any]
"""``attach(hf_model, hooks, current) -> collector``: registers hooks through ``hooks``, returns what they fill."""

OnBatch = Callable[[nn.Module, Tensor, "Tensor | None", Any], None]
"""``on_batch(hf_model, input_ids, attention_mask, output)`` after each forward, with the hooks paused."""

Output = Literal["hidden", "logits"]


def _bar_off(progress: bool) -> bool:
    """No bar when not asked, and under DDP only on rank 0."""
    return not progress or getattr(rank_zero_only, "rank", 0) != 0


def _forward(adapter: ModelAdapter, hf_model: nn.Module, output: Output, ids: Tensor, mask: Tensor | None) -> Any:
    if output == "logits":
        return adapter.forward_logits(hf_model, ids, mask)
    return adapter.forward_decoder(hf_model, ids, mask)


def run_pass(
    model: nn.Module,
    batches: Batches,
    attach: Mapping[str, Attach],
    *,
    on_batch: OnBatch | None = None,
    output: Output = "hidden",
    max_batches: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    desc: str = "calibration",
) -> dict[str, Any]:
    """One pass over ``batches`` filling every collector in ``attach`` (the one-shot protocol).

    Args:
        model: a Hugging Face model or a wrapper around one (see :func:`lit_prune.arch.unwrap`).
        batches: a ``(B, T)`` LongTensor (one batch), or batches that are such tensors or dicts with ``input_ids``
            (and ``attention_mask``).
        attach: ``{name: attach(hf_model, hooks, current)}``; each registers its hooks and returns its collector.
            A torchmetrics ``Metric`` returned is moved to the device the pass runs on.
        on_batch: run after each batch's forward with every hook of the pass paused.
        output: ``"hidden"`` runs the decoder stack only (``on_batch`` gets its ``BaseModelOutput``, final norm
            applied); ``"logits"`` runs the whole LM (``on_batch`` gets the ``(B, T, V)`` logits).
        max_batches: use at most this many batches (None: all).
        progress: show a progress bar (rank 0 only under DDP).
        device: where to run (None: where the model is); a model elsewhere is moved there and back.
        desc: the progress bar's label.

    Returns:
        ``{name: collector}``, filled (on the device the pass ran on).

    Raises:
        ValueError: if ``output`` or ``max_batches`` is invalid, a batch is malformed, or there is no batch.
        TypeError: if a batch is neither a tensor nor a dict with ``input_ids``.
    """
    check_int("max_batches", max_batches, allow_none=True)
    if output not in ("hidden", "logits"):
        raise ValueError(f"`output` must be 'hidden' or 'logits', got {output!r}")
    items, total = _iterate(batches, max_batches)
    current: Current = {"attention_mask": None}
    seen = 0
    with evaluating(model, device) as (hf_model, target), torch.no_grad(), Hooks() as hooks:
        collectors = {name: fn(hf_model, hooks, current) for name, fn in attach.items()}
        for collector in collectors.values():
            if isinstance(collector, nn.Module):  # a torchmetrics Metric; plain collectors keep their own devices
                collector.to(target)
        adapter = adapter_for(hf_model)
        for item in tqdm(items, total=total, desc=desc, disable=_bar_off(progress), leave=False):
            ids, mask = _as_inputs(item)
            ids, mask = ids.to(target), None if mask is None else mask.to(target)
            current["attention_mask"] = mask
            out = _forward(adapter, hf_model, output, ids, mask)
            if on_batch is not None:
                with hooks.paused():
                    on_batch(hf_model, ids, mask, out)
            seen += 1
    if seen == 0:
        raise ValueError("`batches` is empty: no calibration batch to collect statistics from")
    return collectors


def hooked_pass(
    model: nn.Module,
    batches: Batches,
    attach: Attach,
    *,
    max_batches: int | None,
    progress: bool,
    device: str | torch.device | None,
    desc: str,
) -> Any:
    """:func:`run_pass` with a single collector, returned filled."""
    out = run_pass(model, batches, {"_": attach}, max_batches=max_batches, progress=progress, device=device, desc=desc)
    return out["_"]


# --- sequential ------------------------------------------------------------------------------------------------------


@dataclass
class BlockInputs:
    """One calibration batch as the current block receives it (the only activations a sequential pass holds)."""

    hidden: Tensor  # (B, T, d): input of the current block
    calls: BlockCalls  # what the decoder passed the blocks that are kwarg sources (masks, rotary embeddings, ...)
    attention_mask: Tensor | None  # (B, T) padding mask of the batch, for the statistics

    def nbytes(self) -> int:
        """Bytes of the hidden states held for this batch."""
        return self.hidden.numel() * self.hidden.element_size()


def kwarg_sources(model: nn.Module, num_blocks: int) -> list[int]:
    """For each block, the block whose captured keyword arguments it takes.

    Blocks get the same kwargs from the model except under mixed ``config.layer_types`` (e.g. Qwen2/3 or Gemma-3
    sliding and full attention), where each type gets its own attention mask: then the first block of each type is
    the source.

    Raises:
        ValueError: if ``config.layer_types`` is shorter than the number of blocks.
    """
    layer_types = getattr(adapter_for(model).config(model), "layer_types", None)
    if not layer_types or len(set(layer_types[:num_blocks])) <= 1:
        return [0] * num_blocks
    if len(layer_types) < num_blocks:
        raise ValueError(f"`config.layer_types` has {len(layer_types)} entries for {num_blocks} blocks")
    first: dict[str, int] = {}
    return [first.setdefault(kind, b) for b, kind in enumerate(layer_types[:num_blocks])]


def _capture(
    hf_model: nn.Module, sources: list[int], items: Iterable[tuple[Tensor, Tensor | None]], target: torch.device
) -> list[BlockInputs]:
    """Run the decoder on each batch up to the last kwarg source block; keep block 0's inputs and the sources' calls."""
    adapter = adapter_for(hf_model)
    decoder = adapter.decoder(hf_model)
    captured: list[BlockInputs] = []
    for ids, mask in items:
        mask = None if mask is None else mask.to(target)
        forward = functools.partial(adapter.forward_decoder, hf_model, ids.to(target), mask)
        calls = capture_until(decoder, adapter.layers_attr, sources, forward)
        assert calls.first_input is not None  # recorded at block 0
        captured.append(BlockInputs(calls.first_input, calls, mask))
    return captured


def _broadcast_block(block: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers of ``block`` (no-op outside DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*block.parameters(), *block.buffers()]:
            dist.broadcast(tensor.data, src=0)


BlockAttach = Callable[[int, nn.Module, Hooks, Current], Any]
"""``attach(b, block, hooks, current) -> collector``: hooks on block ``b``'s modules for one sequential step."""

OnBlock = Callable[[int, Any], None]
"""``on_block(b, collector)``: reads the filled collector; may change block ``b`` in place."""


def sequential_pass(
    model: nn.Module,
    batches: Batches,
    attach: BlockAttach,
    on_block: OnBlock,
    *,
    max_batches: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    broadcast: bool = True,
    desc: str = "Sequential calibration",
    inspect: Callable[[int, list[BlockInputs]], None] | None = None,
) -> None:
    """Block by block: collect on block ``b``'s inputs, let ``on_block`` change it, then feed its outputs to ``b + 1``.

    Lifecycle: :func:`~lit_prune.stats.replay.capture_until` records each batch's block-0 hidden states and the
    keyword arguments the model passes its blocks (attention mask, rotary embeddings, position ids); the blocks after
    the last one it needs do not run. For each block ``b``: ``attach(b, block, hooks, current)`` registers hooks, the
    block runs on every batch's captured input, the hooks are removed, ``on_block(b, collector)`` runs (and may change
    the block's weights), then the block runs again on the same inputs to make block ``b + 1``'s, which replace them.
    Memory: one ``(B, T, d)`` hidden state per batch (one block's inputs) plus the recorded call arguments, whatever
    the depth.

    Args:
        model: a Hugging Face model or a wrapper around one (see :func:`lit_prune.arch.unwrap`).
        batches: as in :func:`run_pass`; all are held (as one block's hidden states) at once.
        attach: registers block ``b``'s hooks and returns their collector.
        on_block: gets the filled collector of block ``b``; under DDP it must leave every rank's block identical or
            let ``broadcast`` do it.
        max_batches: use at most this many batches.
        progress: show a progress bar over the blocks (rank 0 only under DDP).
        device: where to run (None: where the model is).
        broadcast: under DDP, broadcast each block's parameters and buffers from rank 0 after ``on_block``. Every
            rank must call this with the same number of blocks.
        desc: the progress bar's label.
        inspect: called as ``inspect(b, held inputs)`` before block ``b`` runs (for memory checks).

    Raises:
        ValueError: if ``max_batches`` is invalid, a batch is malformed, or there is no batch.
    """
    check_int("max_batches", max_batches, allow_none=True)
    items, _ = _iterate(batches, max_batches)
    parsed = [_as_inputs(item) for item in items]
    if not parsed:
        raise ValueError("`batches` is empty: no calibration batch to collect statistics from")
    with evaluating(model, device) as (hf_model, target), torch.no_grad():
        blocks = adapter_for(hf_model).blocks(hf_model)
        sources = kwarg_sources(hf_model, len(blocks))
        held = _capture(hf_model, sources, parsed, target)
        current: Current = {"attention_mask": None}
        for b in tqdm(range(len(blocks)), desc=desc, disable=_bar_off(progress), leave=False):
            if inspect is not None:
                inspect(b, held)
            with Hooks() as hooks:
                collector = attach(b, blocks[b], hooks, current)
                for inputs in held:
                    current["attention_mask"] = inputs.attention_mask
                    inputs.calls.run(blocks[b], sources[b], inputs.hidden)
            on_block(b, collector)
            del collector
            if broadcast:
                _broadcast_block(blocks[b])
            if b + 1 < len(blocks):
                for inputs in held:
                    inputs.hidden = inputs.calls.run(blocks[b], sources[b], inputs.hidden)
