"""Surgery by masks: evaluate a candidate without copying the model (skip a block, or zero pruned units' inputs).

Both are exact: a model with block ``i`` skipped computes what the model with block ``i`` removed computes, and
zeroing a head's slice of the o_proj input (a neuron's entry of the down_proj input) removes exactly that unit's
contribution, so the masked forward equals the forward after surgery. Both undo themselves on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lit_prune.arch import Projection, adapter_for
from lit_prune.stats.hooks import Hooks
from lit_prune.surgery.depth import PER_LAYER_CONFIG_ATTRS


@contextlib.contextmanager
def skipping_block(model: nn.Module, index: int) -> Iterator[None]:
    """Run ``model`` without block ``index`` inside the context (forward passes without a KV cache).

    The decoder's block list is swapped for one without the block, and the config's per-block lists
    (``layer_types`` of sliding-window models, ...) and ``num_hidden_layers`` lose the block's entry, as surgery
    would make them; all is restored on exit. ``layer_idx`` values are stale inside: use ``use_cache=False``.
    """
    adapter = adapter_for(model)
    decoder = adapter.decoder(model)
    blocks = adapter.blocks(model)
    if not 0 <= index < len(blocks) or len(blocks) < 2:
        raise ValueError(f"Cannot skip block {index} of a model with {len(blocks)} blocks")
    cfg = adapter.config(model)
    saved: dict[str, Any] = {}
    if cfg is not None:
        for attr in ("num_hidden_layers", *PER_LAYER_CONFIG_ATTRS):
            if getattr(cfg, attr, None) is not None:
                saved[attr] = getattr(cfg, attr)
    sliding = decoder.__dict__.get("has_sliding_layers")
    setattr(decoder, adapter.layers_attr, nn.ModuleList(b for i, b in enumerate(blocks) if i != index))
    try:
        for attr, value in saved.items():
            setattr(
                cfg,
                attr,
                value - 1 if attr == "num_hidden_layers" else type(value)(v for i, v in enumerate(value) if i != index),
            )
        if isinstance(sliding, bool) and "layer_types" in saved:
            setattr(decoder, "has_sliding_layers", "sliding_attention" in cfg.layer_types)
        yield
    finally:
        setattr(decoder, adapter.layers_attr, blocks)
        for attr, value in saved.items():
            setattr(cfg, attr, value)
        if isinstance(sliding, bool):
            setattr(decoder, "has_sliding_layers", sliding)


def _columns_mask(proj: Projection, keep: Sequence[int]) -> torch.Tensor:
    """A 0/1 vector over the input columns of ``proj``'s Linear that keeps the columns of the units ``keep``."""
    weight = proj.linear.weight
    mask = torch.zeros(int(proj.linear.in_features), dtype=weight.dtype, device=weight.device)
    mask[proj.indices(keep).to(weight.device)] = 1
    return mask


def _input_mask_hook(mask: torch.Tensor) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
        if args:
            return (args[0] * mask.to(args[0].dtype), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["input"] = kwargs["input"] * mask.to(kwargs["input"].dtype)
        return args, kwargs

    return hook


def register_width_masks(
    model: nn.Module,
    keep_heads: Mapping[int, Sequence[int]],
    keep_neurons: Mapping[int, Sequence[int]],
    hooks: Hooks,
) -> None:
    """Zero the o_proj input of every head and the down_proj input of every neuron that is not kept.

    Registered through ``hooks`` (removed when it closes). Register these before any statistics hooks on the same
    projections, so that the statistics see the masked model. Blocks missing from a mapping keep every unit.
    """
    adapter = adapter_for(model)
    head_dim = adapter.head_dim(model)
    blocks = adapter.blocks(model)
    for b, keep in keep_heads.items():
        view = adapter.attention(blocks[b], head_dim)
        hooks.forward_pre(view.o.module, _input_mask_hook(_columns_mask(view.o, keep)))
    for b, keep in keep_neurons.items():
        mlp = adapter.mlp(blocks[b])
        hooks.forward_pre(mlp.down.module, _input_mask_hook(_columns_mask(mlp.down, keep)))
