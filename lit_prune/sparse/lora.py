"""LoRA on a sparse base: train the update through the keep mask, and merge so both the outputs and the zeros stay.

A plain LoRA update ``B·A`` is dense; merged into a sparse weight and masked again, the part of it that fell on pruned
weights is dropped, and the merged model is not the model that was trained. Here every adapted Linear whose base
layer carries a ``weight_mask`` computes ``base(x) + x · ((B·A·scale) ⊙ M)ᵀ`` instead, so the trained model *is* the
merged one (merge, then re-apply the mask: :func:`lit_prune.recovery.lora.merge_lora`). Cost: one dense ``out × in``
delta per adapted Linear in the forward pass, kept for the backward (for SmolLM2-135M with adapters on every
projection about the size of the model's weights; for large models, adapt fewer blocks, e.g. ``CKALoRA``).
Layers without a mask, merged or disabled adapters, mixed-adapter batches and LoRA variants (DoRA) use PEFT's own
forward. An adapter saved alone and loaded with stock PEFT applies ``B·A`` unmasked: deploy the merged model.

Merging (:func:`merge_lora`, :func:`is_lora`) lives here, below :mod:`lit_prune.recovery.lora` (which re-exports it),
because it needs the masks (:mod:`lit_prune.sparse.masks`) and the masks' users need it: every module imports the
next one down at top level, with no cycle.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from lit_prune.sparse.masks import MASK_BUFFER, reapply_masks_after_merge

_PATCHED = "_lit_prune_masked_delta"

RECORD_ATTR = "lit_prune_lora"
"""Attribute of an adapter-wrapped model holding ``{"spec": ..., "trainable_before": [...]}``."""


def _masked_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT ``lora.Linear.forward`` with the update masked by the base layer's ``weight_mask`` (vanilla LoRA)."""
    mask = self.base_layer._buffers.get(MASK_BUFFER)
    plain = (
        mask is None
        or mask.dtype != torch.bool
        or self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or getattr(self, "fan_in_fan_out", False)
        or any(name in getattr(self, "lora_variant", {}) for name in self.active_adapters)
    )
    if plain:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
        delta = (b @ a * self.scaling[name]).masked_fill(~mask, 0)  # (out, in)
        result = result + F.linear(self.lora_dropout[name](self._cast_input_dtype(x, a.dtype)), delta)
    return result.to(dtype)


def mask_lora_deltas(model: nn.Module) -> int:
    """Make every PEFT LoRA Linear of ``model`` train its update through its base layer's mask; return how many.

    Patches the instances (not the class); a layer whose base has no mask (yet: a checkpoint restores masks after
    the adapters are re-attached) keeps PEFT's behaviour until it has one. Calling it again is a no-op.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not getattr(module, _PATCHED, False):
            module.forward = MethodType(_masked_forward, module)  # type: ignore[method-assign]
            setattr(module, _PATCHED, True)
            count += 1
    return count


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper (adapters attached and not merged)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "merge_and_unload", None))


def merge_lora(model: nn.Module) -> PreTrainedModel:
    """Fold the adapters of a PEFT model into its base weights; return the plain model (same object as attached).

    Base parameters that were trainable before :func:`~lit_prune.recovery.lora.attach_lora` become trainable again.
    Sparsity masks (``weight_mask`` buffers, :mod:`lit_prune.sparse`) are re-applied after the merge, so a sparse
    model stays exactly as sparse; adapters attached by ``attach_lora`` trained their update through the mask
    (:func:`mask_lora_deltas`), so nothing they learned is dropped (adapters attached otherwise lose the part of
    ``B·A`` on pruned weights).
    """
    record = getattr(model, RECORD_ATTR, None)
    base = model.merge_and_unload()  # type: ignore[operator]
    reapply_masks_after_merge(base)
    if record is not None:
        trainable = set(record["trainable_before"])
        for name, p in base.named_parameters():
            p.requires_grad_(name in trainable)
    return base


def merge_lora_masked(model: nn.Module) -> nn.Module:
    """Merge the LoRA adapters of a PEFT model and re-apply the masks (:func:`merge_lora`).

    ``W + BA`` is dense, so a plain merge destroys the sparsity; re-applying the masks keeps it exactly, at the cost
    of dropping the part of the update that falls on pruned weights (the merged model's outputs differ slightly from
    the adapter model's; the dropped norm is logged). ``merge_lora`` and ``merge_adapters`` do the same (the buffers
    survive the merge and :func:`~lit_prune.sparse.masks.reapply_masks_after_merge` runs after it); this name only
    insists on adapters being attached. Alternative that loses nothing: keep the adapter unmerged (``save_adapter``)
    and serve sparse base + dense low-rank adapter.

    Args:
        model: the PEFT model returned by :func:`~lit_prune.recovery.lora.attach_lora`.

    Returns:
        The plain merged model (the object the adapters were attached to), masks still attached.

    Raises:
        TypeError: if ``model`` carries no LoRA adapters.
    """
    if not is_lora(model):
        raise TypeError(f"merge_lora_masked needs a model with LoRA adapters, got {type(model).__name__}")
    return merge_lora(model)  # re-applies the masks (reapply_masks_after_merge)
