"""Unstructured sparsity masks on a live model: attach, re-apply, fold, restore from checkpoints.

A mask is a ``bool`` tensor of the weight's shape, ``True`` = keep. It lives as a **persistent** buffer named
``weight_mask`` on the ``nn.Linear`` it masks, so a Lightning checkpoint (the module ``state_dict``) carries it as
``<linear>.weight_mask``, DDP broadcasts it with the other buffers and ``model.to(dtype)`` leaves it ``bool``. Under
PEFT the buffer stays on the wrapped Linear, which PEFT keeps as ``<proj>.base_layer`` (state-dict key
``...q_proj.base_layer.weight_mask``); ``merge_and_unload`` puts that very Linear back, buffer included.

Masks are only bookkeeping: the forward pass uses the (zeroed) weight, never the mask. Call :func:`apply_masks` after
optimizer steps, and :func:`fold_masks` before ``save_pretrained`` so the saved model is a plain one with zeros.

Names are qualified names inside the Hugging Face model (``unwrap(model)``), e.g. ``model.layers.0.self_attn.q_proj``,
and are the same for a bare model, a PEFT wrapper (the slot holding the LoRA layer) and a LightningModule holding one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lit_prune.arch import block_linears, unwrap

log = logging.getLogger(__name__)

MASK_BUFFER = "weight_mask"
"""Name of the persistent ``bool`` keep-mask buffer on each masked ``nn.Linear``."""


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: Linear}`` of every block's prunable projections, by block then position; never embeddings or LM head.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> names = list(prunable_linears(LlamaForCausalLM(cfg)))
        >>> len(names), names[0], names[-1]
        (14, 'model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.down_proj')
    """
    return {name: linear for block in block_linears(model) for name, linear in block.items()}


def _check_masks(linears: Mapping[str, nn.Linear], masks: Mapping[str, Tensor]) -> None:
    """Raise naming the first bad key, dtype or shape; modifies nothing."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"`masks` must be a mapping {{linear name: bool tensor}}, got {type(masks).__name__}")
    for name, mask in masks.items():
        if name not in linears:
            example = next(iter(linears), "<none>")
            raise ValueError(
                f"`masks` has key {name!r}, which is not one of the {len(linears)} prunable Linear names "
                f"(like {example!r}; see prunable_linears)"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"`masks[{name!r}]` must be a bool tensor (True = keep), got {got}; use `.bool()`")
        weight = linears[name].weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"`masks[{name!r}]` must have the weight's shape (out, in) = {tuple(weight.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        if hasattr(linears[name], "weight_orig"):
            raise ValueError(f"`{name}` is pruned with torch.nn.utils.prune; remove that first (prune.remove)")


def attach_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Store each keep mask as the ``weight_mask`` buffer of its Linear and zero the pruned weights now.

    Masks for a subset of the Linears are fine; an existing mask is replaced (not combined). Every key, dtype and
    shape is checked before anything is modified. The masks are copied to the weights' device.

    Args:
        model: a Hugging Face model, or a PEFT / LightningModule wrapper around one.
        masks: ``{name: bool tensor of the weight's shape}`` with names from :func:`prunable_linears`.

    Raises:
        TypeError: if ``masks`` is not a mapping or a mask is not a bool tensor.
        ValueError: naming the key, if it is not a prunable Linear or its mask has the wrong shape.
    """
    linears = prunable_linears(model)
    _check_masks(linears, masks)
    with torch.no_grad():
        for name, mask in masks.items():
            linear = linears[name]
            keep = torch.empty_like(linear.weight, dtype=torch.bool).copy_(mask)  # a contiguous copy
            linear.register_buffer(MASK_BUFFER, keep, persistent=True)
            linear.weight.masked_fill_(~keep, 0)


def _mask(module: nn.Module) -> Tensor | None:
    """The keep mask ``module`` carries (torch.nn.utils.prune's float ``weight_mask`` is not one), or None."""
    mask = module._buffers.get(MASK_BUFFER)
    return mask if mask is not None and mask.dtype == torch.bool else None


def _masked_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in unwrap(model).modules() if _mask(m) is not None]


def apply_masks(model: nn.Module) -> int:
    """Zero every masked weight again (after an optimizer step or a dense LoRA merge); return how many Linears."""
    modules = _masked_modules(model)
    with torch.no_grad():
        for module in modules:
            module.weight.masked_fill_(~_mask(module), 0)  # type: ignore[union-attr,operator]
    return len(modules)


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """``{name: mask}`` of the prunable Linears that carry a mask (the live buffers: clone before changing them)."""
    found = {}
    for name, linear in prunable_linears(model).items():
        mask = _mask(linear)
        if mask is not None:
            found[name] = mask
    return found


def detach_masks(model: nn.Module) -> dict[str, Tensor]:
    """Remove the mask buffers without touching the weights; return the removed masks by name."""
    removed = masks_of(model)
    linears = prunable_linears(model)
    for name in removed:
        delattr(linears[name], MASK_BUFFER)
    return removed


def fold_masks(model: nn.Module) -> dict[str, Tensor]:
    """Zero the masked weights, then remove the buffers: a plain ``save_pretrained`` has zeros and no extra keys.

    Returns:
        The removed masks by name.
    """
    apply_masks(model)
    return detach_masks(model)


def _restore_masks_hook(target: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of :func:`restore_masks_on_load`: placeholder buffers for the masks in the state."""
    suffix = "." + MASK_BUFFER
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith(suffix)):
            continue
        try:
            linear = target.get_submodule(key[len(prefix) : -len(suffix)])
        except AttributeError:
            continue  # left to the strict check (unexpected key)
        if isinstance(linear, nn.Linear) and MASK_BUFFER not in linear._buffers and isinstance(value, Tensor):
            placeholder = torch.ones(value.shape, dtype=torch.bool, device=linear.weight.device)
            linear.register_buffer(MASK_BUFFER, placeholder, persistent=True)


def restore_masks_on_load(module: nn.Module) -> RemovableHandle:
    """Let ``module.load_state_dict`` recreate ``weight_mask`` buffers a fresh (mask-less) model lacks.

    Registers a load-state-dict pre-hook on ``module``: for every ``<path>.weight_mask`` key that names an
    ``nn.Linear`` without a mask, it registers a placeholder buffer, which the load then fills. Without it, a strict
    load of a masked checkpoint into a fresh model fails on unexpected keys. Lightning loads the model state before
    any callback state, so a callback registers this in ``setup`` (before the restore).

    Args:
        module: the module whose ``load_state_dict`` will be called (e.g. the LightningModule).

    Returns:
        The hook handle (``.remove()`` to unregister).
    """
    return module.register_load_state_dict_pre_hook(_restore_masks_hook)  # module-level: picklable (spawn)


def reapply_masks_after_merge(model: nn.Module) -> int:
    """Zero the masked weights of a just-merged model and log the norm of the LoRA update that fell on them.

    Returns:
        How many masked Linears there are (0: nothing logged).
    """
    modules = _masked_modules(model)
    if not modules:
        return 0
    dropped = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for module in modules:
            keep: Tensor = _mask(module)  # type: ignore[assignment]
            weight: Tensor = module.weight  # type: ignore[assignment]
            dropped += weight.masked_select(~keep).double().square().sum().cpu()
            weight.masked_fill_(~keep, 0)
    log.info(
        "Merged LoRA and re-applied %d masks; dropped update norm %.4g on pruned weights", len(modules), dropped.sqrt()
    )
    return len(modules)
