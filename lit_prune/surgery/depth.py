"""Depth surgery: remove whole blocks so real tensors go away.

It removes whole blocks in place (the Trainer and the LightningModule keep holding the same model object)
and keeps everything that counts blocks consistent with the new depth:

* the decoder's block list is a new ``nn.ModuleList`` of the surviving blocks, in order;
* the (text) config: ``num_hidden_layers``; the per-layer lists in :data:`PER_LAYER_CONFIG_ATTRS` (``layer_types``
  of sliding-window models, ...) lose the removed entries; ``max_window_layers`` (Qwen2/Qwen3: the first layer
  index that may slide) is recounted on the surviving blocks; a heterogeneous ``per_layer_config`` is re-keyed;
* every ``layer_idx`` attribute inside a surviving block is set to its new position, so KV caches index correctly;
* cached state that depends on the depth is dropped (a ``torch.compile``'d call, ``has_sliding_layers``);
* PEFT ``layers_to_transform`` lists are renumbered, so later adapter injection targets the same blocks.

The result saves with ``save_pretrained`` and reloads with plain ``AutoModelForCausalLM.from_pretrained``.
Every argument is validated before anything is modified: a failing call leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch import nn

from lit_prune.arch import adapter_for, unwrap
from lit_prune.plan import _checked_indices
from lit_prune.surgery.config import sync_config

log = logging.getLogger(__name__)

PER_LAYER_CONFIG_ATTRS: tuple[str, ...] = ("layer_types", "mlp_layer_types", "no_rope_layers")
"""Config attributes holding one entry per block (when present and not None); surgery drops the removed entries.
``layer_types``: attention kind per layer (``"full_attention"``/``"sliding_attention"``, Qwen2/Qwen3/Mistral-style
configs); ``mlp_layer_types``: MLP kind per layer; ``no_rope_layers``: SmolLM3's per-layer RoPE flags."""


def _check_config_depth(cfg: Any, num_blocks: int) -> None:
    """Raise if a per-layer config list does not have one entry per block (surgery could not keep it right)."""
    if cfg is None:
        return
    for attr in PER_LAYER_CONFIG_ATTRS:
        values = getattr(cfg, attr, None)
        if values is not None and len(values) != num_blocks:
            raise ValueError(
                f"config.{attr} has {len(values)} entries but the model has {num_blocks} blocks; "
                f"refusing to remove blocks from an inconsistent model"
            )


def _update_config(cfg: Any, keep: list[int]) -> None:
    """Make ``cfg`` describe the surviving blocks ``keep`` (their old indices, in order)."""
    new_of_old = {old: new for new, old in enumerate(keep)}
    heterogeneity = cfg.__dict__.get("_heterogeneity_spec")
    cfg.num_hidden_layers = len(keep)
    for attr in PER_LAYER_CONFIG_ATTRS:
        values = getattr(cfg, attr, None)
        if values is not None:
            setattr(cfg, attr, type(values)(values[i] for i in keep))
    max_window = cfg.__dict__.get("max_window_layers")
    if isinstance(max_window, int) and not isinstance(max_window, bool):
        cfg.max_window_layers = sum(1 for i in keep if i < max_window)
    if heterogeneity is not None:
        overrides = {
            new_of_old[old]: dict(values)
            for old, values in heterogeneity.per_layer_overrides.items()
            if old in new_of_old
        }
        cfg.per_layer_config = overrides or None


def _peft_configs(model: nn.Module) -> list[Any]:
    """PEFT adapter configs of ``model`` and of every wrapper on the way to the HF model (each config once)."""
    found: dict[int, Any] = {}
    current: Any = model
    for _ in range(8):
        configs = getattr(current, "peft_config", None)
        if isinstance(configs, dict):
            found.update((id(c), c) for c in configs.values())
        if hasattr(current, "get_base_model") and callable(current.get_base_model):
            inner = current.get_base_model()
        elif hasattr(current, "config"):
            break
        else:
            inner = getattr(current, "model", None)
        if not isinstance(inner, nn.Module) or inner is current:
            break
        current = inner
    return list(found.values())


def _renumber_peft(model: nn.Module, new_of_old: dict[int, int]) -> None:
    """Renumber ``layers_to_transform`` of PEFT configs so they name the same (surviving) blocks."""
    for peft_cfg in _peft_configs(model):
        layers = getattr(peft_cfg, "layers_to_transform", None)
        if layers is None:
            continue
        old = [layers] if isinstance(layers, int) else list(layers)
        new = [new_of_old[i] for i in old if i in new_of_old]
        peft_cfg.layers_to_transform = new
        log.debug("PEFT layers_to_transform renumbered after block removal: %s -> %s", old, new)
        if not new:
            log.warning(
                "Every block listed in PEFT layers_to_transform %s was removed; the adapter config now lists none",
                old,
            )


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> list[int]:
    """Remove transformer blocks from ``model`` in place and keep config, ``layer_idx`` and caches consistent.

    The model object stays the same (a Trainer or a PEFT wrapper holding it sees the change); the decoder gets a
    new ``nn.ModuleList`` of the surviving blocks. See the module docstring for everything that is updated.
    Optimizers holding the removed parameters must be rebuilt by the caller.

    Args:
        model: a Hugging Face causal LM (or bare decoder), possibly inside a PEFT wrapper or a ``CausalLMModule``.
        indices: indices of the blocks to remove, in the model's current numbering. Empty removes nothing.

    Returns:
        The removed indices, sorted.

    Raises:
        ValueError: if an index is not an integer, is outside ``[0, num_blocks)`` (negative indices included), is
            repeated, or if every block would be removed; or if a per-layer config list does not match the model's
            depth. Nothing is modified when it raises.
        lit_prune.arch.UnsupportedModelError: if the model family has no adapter.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> remove_blocks(model, [2, 0])
        [0, 2]
        >>> model.config.num_hidden_layers, [b.self_attn.layer_idx for b in model.model.layers]
        (2, [0, 1])
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    num_blocks = len(blocks)
    drop = sorted(_checked_indices(indices, num_blocks))
    if len(drop) == num_blocks:
        raise ValueError(
            f"Cannot remove all {num_blocks} blocks (got `indices`={drop}); at least one block must remain"
        )
    cfg = adapter.config(model)
    _check_config_depth(cfg, num_blocks)
    if not drop:
        log.debug("No blocks to remove; the model keeps its %d blocks", num_blocks)
        return []

    # --- everything below modifies the model; nothing below may raise on user input -------------------------
    params_before = adapter.total_params(model)
    dropped = set(drop)
    keep = [i for i in range(num_blocks) if i not in dropped]
    new_of_old = {old: new for new, old in enumerate(keep)}
    setattr(adapter.decoder(model), adapter.layers_attr, nn.ModuleList(blocks[i] for i in keep))

    for new_index, block in enumerate(adapter.blocks(model)):
        for module in block.modules():
            layer_idx = module.__dict__.get("layer_idx")
            if isinstance(layer_idx, int) and not isinstance(layer_idx, bool):
                setattr(module, "layer_idx", new_index)

    if cfg is not None:
        _update_config(cfg, keep)
        layer_types = getattr(cfg, "layer_types", None)
        decoder = adapter.decoder(model)
        if layer_types is not None and isinstance(decoder.__dict__.get("has_sliding_layers"), bool):
            setattr(decoder, "has_sliding_layers", "sliding_attention" in layer_types)

    hf_model = unwrap(model)
    for attr in ("_compiled_call", "_last_compile_config"):
        hf_model.__dict__.pop(attr, None)  # a torch.compile'd call traced the old depth
    _renumber_peft(model, new_of_old)
    if cfg is not None:
        sync_config(model)  # a non-uniform model's per-block width record loses the removed blocks

    params_after = adapter.total_params(model)
    log.debug(
        "Removed blocks %s: %d -> %d blocks, parameters %s -> %s (-%.1f%%)",
        drop,
        num_blocks,
        len(keep),
        f"{params_before:,}",
        f"{params_after:,}",
        100.0 * (1 - params_after / params_before) if params_before else 0.0,
    )
    return drop
