"""LoRA on a sparse base: train the update through the keep mask, so the merge keeps both the outputs and the zeros.

A plain LoRA update ``B·A`` is dense; merged into a sparse weight and masked again, the part of it that fell on pruned
weights is dropped, and the merged model is not the model that was trained. Here every adapted Linear whose base
layer carries a ``weight_mask`` computes ``base(x) + x · ((B·A·scale) ⊙ M)ᵀ`` instead, so the trained model *is* the
merged one (merge, then re-apply the mask: :func:`lit_prune.recovery.lora.merge_lora`). Cost: one dense ``out × in``
delta per adapted Linear in the forward pass, kept for the backward (for SmolLM2-135M with adapters on every
projection about the size of the model's weights; for large models, adapt fewer blocks, e.g. ``CKALoRA``).
Layers without a mask, merged or disabled adapters, mixed-adapter batches and LoRA variants (DoRA) use PEFT's own
forward. An adapter saved alone and loaded with stock PEFT applies ``B·A`` unmasked: deploy the merged model.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_prune.sparse.masks import MASK_BUFFER

_PATCHED = "_lit_prune_masked_delta"


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
