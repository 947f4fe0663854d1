"""Structural surgery: the code that changes a model's structure, so real tensors go away.

* :mod:`lit_prune.surgery.apply`: :func:`apply_plan`, a :class:`~lit_prune.plan.PruningPlan` applied in place;
* :mod:`lit_prune.surgery.depth`: :func:`remove_blocks` (config, ``layer_idx``, caches and PEFT lists follow);
* :mod:`lit_prune.surgery.width`: :func:`prune_heads` / :func:`prune_neurons` (smaller ``nn.Linear`` s, fused
  layouts kept, from the adapter's slice maps);
* :mod:`lit_prune.surgery.config`: per-block widths and the config record that lets non-uniform models reload;
* :mod:`lit_prune.surgery.masks`: surgery simulated without copying the model (a block skipped, units' inputs
  zeroed): exactly what the pruned model computes, undone on exit (MoP's candidates).

Every function validates its arguments before it modifies anything: a failing call leaves the model as it was.
"""

from lit_prune.surgery.apply import apply_plan
from lit_prune.surgery.config import (
    LAYER_SHAPES_KEY,
    BlockShape,
    block_shapes,
    is_uniform,
    loads_without_lit_prune,
    resize_to_shapes,
    shapes_from_config,
    sync_config,
)
from lit_prune.surgery.depth import PER_LAYER_CONFIG_ATTRS, remove_blocks
from lit_prune.surgery.masks import register_width_masks, skipping_block
from lit_prune.surgery.width import check_width_keep, kv_heads_kept, prune_heads, prune_neurons

__all__ = [
    "LAYER_SHAPES_KEY",
    "PER_LAYER_CONFIG_ATTRS",
    "BlockShape",
    "apply_plan",
    "block_shapes",
    "check_width_keep",
    "is_uniform",
    "kv_heads_kept",
    "loads_without_lit_prune",
    "prune_heads",
    "prune_neurons",
    "register_width_masks",
    "remove_blocks",
    "resize_to_shapes",
    "shapes_from_config",
    "skipping_block",
    "sync_config",
]
